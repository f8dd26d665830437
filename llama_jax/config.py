"""Two frozen configs: `LlamaConfig`, what a checkpoint holds (the architecture; named presets and
`from_hf` for a transformers config.json), and `RuntimeConfig`, how it runs (dtypes, kernels, the
CPU backend, the prefill chunk). `load`, `Trainer` and the serving engine take both."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

_DTYPES = ("float32", "bfloat16")
ATTENTION_IMPLS = ("auto", "xla", "pallas", "mosaic", "cudnn")
NORM_IMPLS = ("auto", "xla", "pallas")
CPU_KERNELS = ("auto", "on", "off")
# Fields that converted checkpoints written before RuntimeConfig existed carry in llama_config.json;
# they said how that run computed, not what the checkpoint is, and are ignored when read.
_RUNTIME_FIELDS = ("param_dtype", "dtype", "attention_impl", "norm_impl", "prefill_chunk")


def default_dtype() -> str:
    """bfloat16 on accelerators, float32 on CPU (XLA CPU converts bf16 to f32 before each matmul)."""
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# Prompt tokens per prefill chunk: larger chunks make larger products (docs/PERFORMANCE.md has the
# CPU figures by chunk size), at activation memory bounded by the chunk.
DEFAULT_PREFILL_CHUNK = 2048


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency scaling ("rope_type": "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """The architecture: what a checkpoint holds, nothing of how it runs (see RuntimeConfig)."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int | None = None  # None: dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    bos_id: int | None = 128000
    eos_ids: tuple[int, ...] = (128001, 128009)

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"LlamaConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim must be even for RoPE, got {self.head_dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlamaConfig":
        d = {k: v for k, v in d.items() if k not in _RUNTIME_FIELDS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown LlamaConfig fields: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any], **overrides) -> "LlamaConfig":
        """Reads a transformers `config.json` (a path to the file or its directory, or the dict)."""
        if isinstance(path_or_dict, dict):
            hf, where = path_or_dict, "config"
        else:
            where = os.fspath(path_or_dict)
            if os.path.isdir(where):
                where = os.path.join(where, "config.json")
            if not os.path.isfile(where):
                raise FileNotFoundError(f"{where}: no such config.json")
            try:
                with open(where) as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e})") from None
        return cls(**_from_hf_dict(hf, where), **overrides)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """How a model runs, apart from what it is: fixed when a program is built (`load`, `Trainer`,
    the serving engine), never stored in a checkpoint.

    param_dtype, dtype: parameters and activations ("float32" or "bfloat16"); None picks bfloat16 on
      a GPU and float32 on a CPU. Matmuls accumulate in f32 either way.
    attention_impl: "auto" (on a GPU: "mosaic" on Hopper and later for bf16, else "pallas"; "xla"
      elsewhere), "xla", "pallas" (the Triton kernels; interpret mode on a CPU: slow, for tests),
      "mosaic" (the Mosaic GPU prefill and training kernels, wgmma and TMA: attention, and the
      quantized weights' prefill products; compute capability 9.0+, bf16 or f16; decode keeps the
      Triton kernels) or "cudnn". norm_impl: "auto", "xla" or "pallas".
    cpu_kernels: the optional C++ CPU backend (the `cpu_kernels` package, `pip install
      llama-jax[cpu]`): "auto" uses it where it serves (a CPU, float32, no mesh, built and loaded),
      "on" the same but fails at load when it cannot build, "off" never.
    prefill_chunk: prompt tokens per prefill step (a multiple of 16; None: DEFAULT_PREFILL_CHUNK).
    """

    param_dtype: str | None = None
    dtype: str | None = None
    attention_impl: str = "auto"
    norm_impl: str = "auto"
    cpu_kernels: str = "auto"
    prefill_chunk: int | None = None

    def __post_init__(self):
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in (None, *_DTYPES):
                raise ValueError(f"{name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.norm_impl not in NORM_IMPLS:
            raise ValueError(f"norm_impl must be one of {NORM_IMPLS}, got {self.norm_impl!r}")
        if self.cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels must be one of {CPU_KERNELS}, got {self.cpu_kernels!r}")
        if self.prefill_chunk is not None and (not isinstance(self.prefill_chunk, int) or self.prefill_chunk < 16
                                               or self.prefill_chunk % 16):
            raise ValueError(f"prefill_chunk must be a positive multiple of 16 (the kernels' smallest tile), "
                             f"got {self.prefill_chunk!r}")

    def resolved(self) -> "RuntimeConfig":
        """This config with every choice concrete: dtypes and prefill chunk (None becomes the
        backend's default), the kernels ("auto" becomes the backend's) and cpu_kernels "on" or
        "off" (building the library if "auto" or "on" asks for it; RuntimeError when "on" cannot be
        served)."""
        dtype = self.dtype or default_dtype()
        return dataclasses.replace(self, param_dtype=self.param_dtype or default_dtype(), dtype=dtype,
                                   attention_impl=_resolve_attention(self.attention_impl, dtype),
                                   norm_impl=_resolve_norm(self.norm_impl),
                                   prefill_chunk=self.prefill_chunk or DEFAULT_PREFILL_CHUNK,
                                   cpu_kernels=_resolve_cpu_kernels(self.cpu_kernels))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _resolve_attention(impl: str, dtype: str) -> str:
    """"auto": on a GPU, the Mosaic GPU kernels where they run (compute capability 9.0 and up: wgmma
    and TMA; bf16), the Triton ones elsewhere (A100s, f32); XLA's blocked attention off a GPU."""
    if impl != "auto":
        return impl
    import jax

    if jax.default_backend() != "gpu":
        return "xla"
    return "mosaic" if hopper_or_later() and dtype == "bfloat16" else "pallas"


def hopper_or_later() -> bool:
    """Whether JAX's first device is an NVIDIA GPU of compute capability 9.0 or later (wgmma, TMA:
    what the Mosaic GPU kernels need)."""
    import jax

    device = jax.devices()[0]
    return device.platform == "gpu" and float(getattr(device, "compute_capability", 0) or 0) >= 9.0


def _resolve_norm(impl: str) -> str:
    if impl != "auto":
        return impl
    import jax

    return "pallas" if jax.default_backend() == "gpu" else "xla"


def _resolve_cpu_kernels(choice: str) -> str:
    """"on" or "off" for a RuntimeConfig.cpu_kernels choice. "auto" is quietly off where the backend
    is not installed (no `cpu` extra) or JAX runs on an accelerator; a build that fails where it is
    installed is a one-line warning, once, and XLA's code."""
    if choice == "off":
        return "off"
    import warnings

    import jax

    import cpu_kernels

    if choice == "auto" and (jax.default_backend() != "cpu" or not cpu_kernels.installed()):
        return "off"
    why = cpu_kernels.load()
    if why is None:
        return "on"
    if choice == "on":
        raise RuntimeError(f"cpu_kernels='on' cannot be served: {why}")
    warnings.warn(f"cpu_kernels: using XLA's code ({why})", stacklevel=4)  # once: the same line and text
    return "off"


def _from_hf_dict(hf: dict[str, Any], where: str) -> dict[str, Any]:
    def fail(msg):
        raise ValueError(f"{where}: {msg}")

    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        fail(f"unsupported model_type {model_type!r} (only 'llama')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            fail(f"unsupported {flag}=true (Llama 3 has no biases)")
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"unsupported hidden_act {hf['hidden_act']!r} (only 'silu')")
    if hf.get("pretraining_tp", 1) not in (1, None):
        fail("unsupported pretraining_tp != 1")
    try:
        dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
        out = dict(
            vocab_size=int(hf["vocab_size"]),
            dim=dim,
            n_layers=int(hf["num_hidden_layers"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            ffn_dim=int(hf["intermediate_size"]),
        )
    except KeyError as e:
        fail(f"missing key {e.args[0]!r}")
    out["head_dim"] = int(hf.get("head_dim") or dim // n_heads)
    out["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
    out["max_seq_len"] = int(hf.get("max_position_embeddings", 8192))
    out["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))

    # transformers <5 writes rope_theta and rope_scaling; transformers 5 writes rope_parameters,
    # which holds rope_theta too.
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    out["rope_theta"] = float(theta)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
        try:
            out["rope_scaling"] = RopeScaling(
                factor=float(rope["factor"]),
                low_freq_factor=float(rope["low_freq_factor"]),
                high_freq_factor=float(rope["high_freq_factor"]),
                original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
            )
        except KeyError as e:
            fail(f"rope scaling 'llama3' is missing {e.args[0]!r}")
    elif rope_type != "default":
        fail(f"unsupported rope_type {rope_type!r} (only 'default' and 'llama3')")

    bos = hf.get("bos_token_id")
    out["bos_id"] = None if bos is None else int(bos)
    eos = hf.get("eos_token_id")
    out["eos_ids"] = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    return out


# Presets: real dimensions, from the published config.json files.
_LLAMA3_VOCAB = 128256
_LLAMA31_ROPE = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position_embeddings=8192)
_LLAMA32_ROPE = dataclasses.replace(_LLAMA31_ROPE, factor=32.0)

LLAMA3_8B = LlamaConfig(vocab_size=_LLAMA3_VOCAB, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        ffn_dim=14336, max_seq_len=8192)
LLAMA3_70B = LlamaConfig(vocab_size=_LLAMA3_VOCAB, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                         ffn_dim=28672, max_seq_len=8192)
LLAMA3_1_8B = dataclasses.replace(LLAMA3_8B, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072)
LLAMA3_1_70B = dataclasses.replace(LLAMA3_70B, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072)
LLAMA3_1_405B = LlamaConfig(vocab_size=_LLAMA3_VOCAB, dim=16384, n_layers=126, n_heads=128, n_kv_heads=8,
                            ffn_dim=53248, rope_scaling=_LLAMA31_ROPE, max_seq_len=131072)
LLAMA3_2_1B = LlamaConfig(vocab_size=_LLAMA3_VOCAB, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                          ffn_dim=8192, head_dim=64, rope_scaling=_LLAMA32_ROPE, max_seq_len=131072,
                          tie_embeddings=True)
LLAMA3_2_3B = LlamaConfig(vocab_size=_LLAMA3_VOCAB, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                          ffn_dim=8192, head_dim=128, rope_scaling=_LLAMA32_ROPE, max_seq_len=131072,
                          tie_embeddings=True)
SMOLLM2_135M = LlamaConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True, bos_id=1,
                           eos_ids=(2,))

PRESETS = {
    "llama3-8b": LLAMA3_8B,
    "llama3-70b": LLAMA3_70B,
    "llama3.1-8b": LLAMA3_1_8B,
    "llama3.1-70b": LLAMA3_1_70B,
    "llama3.1-405b": LLAMA3_1_405B,
    "llama3.2-1b": LLAMA3_2_1B,
    "llama3.2-3b": LLAMA3_2_3B,
    "smollm2-135m": SMOLLM2_135M,
}
