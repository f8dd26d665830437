"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on the linear weights, and PEFT's format.

An adapted weight computes y = x W + scale * (dropout(x) A) B, W frozen, A [in, r] and B [r, out]
trained, scale = alpha / r (alpha / sqrt(r) with rsLoRA). The adapters are a parameter tree of their
own, beside the model's and in the same stored layout (stacked over a leading layer axis L):

    {"layers": {"attention": {"wq": {"a": [L, D, r], "b": [L, r, H*E]}, ...}, "feed_forward": {...}}}

Only the targets present are there. A program reads them through the same `model.Layout` as the
base (`view`, whose inverse for gradients is `stored`), and `wrap` puts each target's adapters beside
its viewed weight as a `model.Adapted`, which the model's products apply: the base weight is never
differentiated, so a training step computes no gradient for it. In a fused layout (wq|wk|wv as one
wqkv, w1|w3 as w13) each part keeps its own adapter, applied to its slice of the fused output.

PEFT's format (`write_peft` / `read`): adapter_config.json and adapter_model.safetensors with one
lora_A.weight [r, in] and lora_B.weight [out, r] per adapted module, named after transformers'
modules (q_proj ... down_proj); `peft.PeftModel.from_pretrained(model, dir)` loads what we write,
and we read what PEFT writes for a Llama (plain LoRA: no DoRA, no extra trained modules).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import model as model_lib
from llama_jax import sharding
from llama_jax.checkpoint import LAYER_TABLE, param_shapes
from llama_jax.config import LlamaConfig
from llama_jax.model import Adapted, Layout

# Target name -> our weight (part, name). The order is also each target's index for dropout keys.
TARGETS: dict[str, tuple[str, str]] = {
    "q": ("attention", "wq"), "k": ("attention", "wk"), "v": ("attention", "wv"), "o": ("attention", "wo"),
    "gate": ("feed_forward", "w1"), "up": ("feed_forward", "w3"), "down": ("feed_forward", "w2"),
}
DEFAULT_TARGETS = tuple(TARGETS)
# Our weight -> PEFT's module name (transformers' Linear: q_proj, ..., down_proj).
_MODULE = {where: LAYER_TABLE[where][0].split(".")[-2] for where in TARGETS.values()}
_TARGET_OF = {where: t for t, where in TARGETS.items()}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(ValueError):
    """An adapter directory we cannot read (not PEFT's LoRA format, or not for this model)."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, alpha, dropout (on each adapter's input, training only), targets (names of TARGETS),
    rslora (scale alpha / sqrt(r), Kalajdzievski 2023, instead of alpha / r)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rslora: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora_rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not (
                math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"lora_alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"lora_targets must be a non-empty tuple of {', '.join(TARGETS)}, got {self.targets!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"lora_targets {tuple(self.targets)}: each one of {', '.join(TARGETS)}, once")
        # One order, so equal settings are equal configs (and compiled programs).
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


# --- The adapter tree -------------------------------------------------------------------------------


def _weight_shape(config: LlamaConfig, part: str, name: str) -> tuple[int, int, int]:
    """(L, in, out) of a target weight in the stored layout."""
    return param_shapes(config)[("layers", part, name)]


def _weight_axes(config: LlamaConfig) -> dict[tuple[str, str], tuple]:
    """The logical axes of each target weight in the stored layout, e.g. ('layers', 'embed', 'q_heads')."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model_lib.abstract(config))))
    return {where: tuple(specs["layers"][where[0]][where[1]]) for where in TARGETS.values()}


def _parts(part: str, layout: Layout) -> dict[str, tuple[str, ...]]:
    """The weights of a block part as `layout` names them, each with the target weights it holds:
    {"wqkv": ("wq", "wk", "wv"), "wo": ("wo",)} when fused, {"wq": ("wq",), ...} otherwise."""
    names = [name for p, name in TARGETS.values() if p == part]
    fused, members = model_lib.FUSED[part]
    if not layout.fused:
        return {name: (name,) for name in names}
    return {fused: members, **{name: (name,) for name in names if name not in members}}


def shapes(config: LlamaConfig, lora: LoraConfig) -> dict:
    """The adapter tree of `config` as ShapeDtypeStructs (float32, stored layout)."""
    out = {}
    for t in lora.targets:
        part, name = TARGETS[t]
        n, k, m = _weight_shape(config, part, name)
        out.setdefault(part, {})[name] = {"a": jax.ShapeDtypeStruct((n, k, lora.rank), jnp.float32),
                                          "b": jax.ShapeDtypeStruct((n, lora.rank, m), jnp.float32)}
    return {"layers": out}


def init(config: LlamaConfig, lora: LoraConfig, key) -> dict:
    """Fresh adapters, float32, as PEFT initialises them: A Kaiming-uniform with a = sqrt(5) (torch's
    nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))), B zero, so the adapted model starts as the base."""
    def one(path, s):
        if path[-1].key == "b":
            return jnp.zeros(s.shape, s.dtype)
        bound = 1.0 / math.sqrt(s.shape[1])
        index = list(TARGETS).index(_TARGET_OF[(path[1].key, path[2].key)])
        return jax.random.uniform(jax.random.fold_in(key, index), s.shape, s.dtype, -bound, bound)
    return jax.tree_util.tree_map_with_path(one, shapes(config, lora))


def shardings(config: LlamaConfig, lora: LoraConfig, mesh) -> dict:
    """Where each adapter goes on `mesh`: A [L, in, r] split as its weight's input axis, B [L, r, out]
    as its output axis (so x A and (x A) B follow the weight's own split); the rank axis whole."""
    axes = _weight_axes(config)

    def one(path, s):
        layers, into, out = axes[(path[1].key, path[2].key)]
        logical = (layers, into, None) if path[-1].key == "a" else (layers, None, out)
        return jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh(logical, s.shape, mesh))
    return jax.tree_util.tree_map_with_path(one, shapes(config, lora))


def nbytes(adapters: dict) -> int:
    """The bytes of an adapter tree's arrays."""
    return sum(int(np.prod(np.shape(a))) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(adapters))


# --- Views: the adapters as a program reads them ----------------------------------------------------


def _block_view(block: dict, layout: Layout) -> dict:
    """One block's adapters (or the stacked blocks') -> {part: {viewed weight name: parts}}, where
    parts has one entry per part of that weight (three for wqkv, one for wq): the part's {"a", "b"}
    or None."""
    out = {}
    for part, names in block.items():
        groups = _parts(part, layout)
        out[part] = {name: tuple(names.get(p) for p in group) for name, group in groups.items()
                     if any(p in names for p in group)}
    return out


def view(adapters: dict, layout: Layout, config: LlamaConfig) -> dict:
    """The adapters (stored layout) as a program of `layout` reads them: per layer when the layout is,
    grouped by the viewed weight they adapt (see `_block_view`). Transposing changes nothing: A and B
    are applied as they are, whatever layout the base weight is in."""
    layers = adapters["layers"]
    if layout.per_layer:
        return {"layers": {i: _block_view(jax.tree.map(lambda a: a[i], layers), layout)
                           for i in range(config.n_layers)}}
    return {"layers": _block_view(layers, layout)}


def stored(viewed: dict, layout: Layout, config: LlamaConfig) -> dict:
    """The inverse of `view` (for gradients): back to the stored adapter tree."""
    def block(b):
        out = {}
        for part, names in b.items():
            groups = _parts(part, layout)
            for name, parts in names.items():
                for p, ab in zip(groups[name], parts):
                    if ab is not None:
                        out.setdefault(part, {})[p] = ab
        return out
    layers = viewed["layers"]
    if layout.per_layer:
        blocks = [block(layers[i]) for i in range(config.n_layers)]
        return {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return {"layers": block(layers)}


def dropout_keys(key, n_layers: int) -> dict[str, jax.Array]:
    """target -> [L] keys: layer l's adapter on that target draws its dropout mask (over its input
    [B, T, in]: keep with probability 1 - p) from key l."""
    return {t: jax.random.split(jax.random.fold_in(key, i), n_layers) for i, t in enumerate(TARGETS)}


def wrap(params: dict, adapters: dict, lora: LoraConfig, layout: Layout, config: LlamaConfig, key=None) -> dict:
    """The parameters (viewed in `layout`) with each adapted weight replaced by a `model.Adapted`
    holding it and its adapters (`view`ed in `layout`): the tree `model.build` takes for a model
    whose products add scale * (dropout(x) A) B. key: dropout's key (None: no dropout, as in
    evaluation); each layer and target draws its own mask from it, the same in every layout."""
    layer_keys = dropout_keys(key, config.n_layers) if key is not None and lora.dropout > 0 else {}

    def keys(part, members, parts, layer):
        return tuple(None if ab is None or not layer_keys else layer_keys[_TARGET_OF[(part, p)]][layer]
                     for p, ab in zip(members, parts))
    return _wrap(params, adapters, layout, config, keys, lora.scale, float(lora.dropout), None)


def _wrap(params, adapters, layout, config, keys, scale, dropout, rows) -> dict:
    """`wrap` and `wrap_rows`: keys(part, members, parts, layer) gives each Adapted's dropout keys."""
    def adapt(block: dict, ads: dict, layer) -> dict:
        block = {part: dict(ws) for part, ws in block.items()}
        for part, names in ads.items():
            groups = _parts(part, layout)
            for name, parts in names.items():
                members = groups[name]
                block[part][name] = Adapted(
                    block[part][name], tuple(None if ab is None else ab["a"] for ab in parts),
                    tuple(None if ab is None else ab["b"] for ab in parts), keys(part, members, parts, layer),
                    scale, dropout, tuple(_weight_shape(config, part, p)[2] for p in members), rows)
        return block

    layers = params["layers"]
    if layout.per_layer:
        layers = {i: adapt(layers[i], adapters["layers"][i], i) for i in range(config.n_layers)}
    else:
        layers = adapt(layers, adapters["layers"], slice(None))
    return dict(params, layers=layers)


# --- Serving many adapters at once ----------------------------------------------------------------


def bank(loaded: list[tuple[LoraConfig, dict]], config: LlamaConfig, dtype=np.float32) -> dict:
    """The adapters `loaded` (each `read`'s (LoraConfig, adapters)) as one tree of banks, stored
    layout: per target any of them adapts, A [L, N + 1, in, r] and B [L, N + 1, r, out], where r is
    the largest rank (smaller ones zero-padded), entry 0 is zeros (the base model: no adapter) and
    entry n adapter n (1-based) with its scale folded into B. Numpy, in `dtype`."""
    r = max(lora.rank for lora, _ in loaded)
    n = len(loaded) + 1
    out: dict = {}
    for i, (lora, adapters) in enumerate(loaded, start=1):
        for part, names in adapters["layers"].items():
            for name, ab in names.items():
                layers, k, m = _weight_shape(config, part, name)
                if name not in out.get(part, {}):
                    out.setdefault(part, {})[name] = {"a": np.zeros((layers, n, k, r), dtype),
                                                      "b": np.zeros((layers, n, r, m), dtype)}
                dst = out[part][name]
                dst["a"][:, i, :, :lora.rank] = ab["a"]
                dst["b"][:, i, :lora.rank, :] = np.asarray(ab["b"], np.float32) * np.float32(lora.scale)
    return {"layers": out}


def wrap_rows(params: dict, banks: dict, rows, layout: Layout, config: LlamaConfig) -> dict:
    """The parameters (viewed in `layout`) with each banked weight a `model.Adapted` whose row b
    applies adapter rows[b] (rows [B] int32, 0: none) from `banks` (`bank`'s tree, `view`ed in
    `layout`): one program serves any mix of adapters."""
    return _wrap(params, banks, layout, config, lambda part, members, parts, layer: (None,) * len(parts),
                 1.0, 0.0, rows)


# --- Merging --------------------------------------------------------------------------------------


def merge(params: dict, adapters: dict, lora: LoraConfig, *, dtype=None) -> dict:
    """The stored-layout parameters with the adapters merged in: W + scale * A B for each adapted
    weight, summed in float32, in W's dtype (a quantized W is dequantized first, and the result is in
    `dtype`, default float32: the function the adapted product computed). Numpy in, numpy out (host
    arrays stay on the host); jax arrays likewise."""
    from llama_jax import quant

    out = dict(params, layers={part: dict(ws) for part, ws in params["layers"].items()})
    for part, names in adapters["layers"].items():
        for name, ab in names.items():
            w = params["layers"][part][name]
            xp = np if isinstance(w, np.ndarray) else jnp
            if isinstance(w, quant.QArray):
                w, xp, to = quant.dequantize(w, jnp.float32), jnp, jnp.dtype(dtype or jnp.float32)
            else:
                to = w.dtype
            a, b = (xp.asarray(ab[k], dtype=np.float32) for k in ("a", "b"))
            delta = xp.matmul(a, b) * np.float32(lora.scale)  # (L, in, out)
            out["layers"][part][name] = (w.astype(np.float32) + delta).astype(to)
    return out


# --- PEFT's format ----------------------------------------------------------------------------------


def _peft_name(part: str, name: str, layer: int, which: str) -> str:
    """e.g. base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"""
    module = LAYER_TABLE[(part, name)][0].format(i=layer).removesuffix(".weight")
    return f"base_model.model.{module}.lora_{which}.weight"


def to_peft_state_dict(adapters: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The adapter tree (or its gradient) as PEFT names its tensors, float32 numpy: lora_A.weight
    [r, in] and lora_B.weight [out, r] per layer and module."""
    tensors = {}
    for part, names in adapters["layers"].items():
        for name, ab in names.items():
            a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)  # (L, in, r), (L, r, out)
            for i in range(config.n_layers):
                tensors[_peft_name(part, name, i, "A")] = np.ascontiguousarray(a[i].T)  # (r, in)
                tensors[_peft_name(part, name, i, "B")] = np.ascontiguousarray(b[i].T)  # (out, r)
    return tensors


def write_peft(directory: str | os.PathLike, adapters: dict, lora: LoraConfig, config: LlamaConfig, *,
               base_model: str | None = None) -> None:
    """adapter_config.json and adapter_model.safetensors (float32) in `directory` (which must exist),
    as PEFT's save_pretrained writes them for a LlamaForCausalLM: what PeftModel.from_pretrained loads.
    base_model: what adapter_config.json names as the base (base_model_name_or_path)."""
    from safetensors.numpy import save_file

    from llama_jax.export import write_json_atomic

    path = os.path.join(directory, WEIGHTS_FILE)
    save_file(to_peft_state_dict(adapters, config), path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    write_json_atomic(os.path.join(directory, CONFIG_FILE), {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": lora.rank, "lora_alpha": alpha, "lora_dropout": lora.dropout, "use_rslora": lora.rslora,
        "target_modules": sorted(_MODULE[TARGETS[t]] for t in lora.targets), "bias": "none",
        "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {}})


_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])"
                  r"(?:\.default)?\.weight$")


def read(directory: str | os.PathLike, config: LlamaConfig) -> tuple[LoraConfig, dict]:
    """(LoraConfig, adapters as numpy float32 in the stored layout) of a PEFT LoRA directory for a
    model of `config` (ours, from `write_peft`, or PEFT's save_pretrained). Layers without adapters
    get zeros. Raises AdapterError, one line, for anything else (DoRA, trained extra modules, biases,
    per-module ranks, a .bin file, shapes of another model)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = os.fspath(directory)
    cfg_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{directory}: no {CONFIG_FILE} (not a PEFT adapter directory)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r}; "
                           "only LORA adapters are read")
    unsupported = [(k, v) for k, v in (("use_dora", cfg.get("use_dora")), ("fan_in_fan_out", cfg.get("fan_in_fan_out")),
                                       ("modules_to_save", cfg.get("modules_to_save")),
                                       ("rank_pattern", cfg.get("rank_pattern")),
                                       ("alpha_pattern", cfg.get("alpha_pattern")),
                                       ("layer_replication", cfg.get("layer_replication"))) if v]
    if cfg.get("bias", "none") != "none":
        unsupported.append(("bias", cfg["bias"]))
    if unsupported:
        k, v = unsupported[0]
        raise AdapterError(f"{cfg_path}: {k}={v!r} is not supported (plain LoRA on q/k/v/o/gate/up/down only)")
    if not os.path.isfile(weights_path):
        other = " (a pickled adapter_model.bin is not read: save with safe_serialization)" if os.path.isfile(
            os.path.join(directory, "adapter_model.bin")) else ""
        raise AdapterError(f"{directory}: no {WEIGHTS_FILE}{other}")
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights_path}: cannot read it ({e})") from None

    module_to_weight = {m: where for where, m in _MODULE.items()}
    found: dict[tuple[str, str], dict[str, dict[int, np.ndarray]]] = {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None or m[3] not in module_to_weight:
            raise AdapterError(f"{weights_path}: tensor {key!r} is not a LoRA A/B of a Llama projection")
        layer = int(m[1])
        if layer >= config.n_layers:
            raise AdapterError(f"{weights_path}: {key!r} is for layer {layer}; the model has {config.n_layers}")
        found.setdefault(module_to_weight[m[3]], {}).setdefault(m[4], {})[layer] = value.astype(np.float32)
    if not found:
        raise AdapterError(f"{weights_path}: holds no LoRA tensors")
    ranks = {v.shape[0] for ab in found.values() for v in ab.get("A", {}).values()}
    rank = cfg.get("r", next(iter(ranks)))
    if ranks != {rank}:
        raise AdapterError(f"{weights_path}: LoRA ranks {sorted(ranks)}, adapter_config.json says r={rank}")
    lora = LoraConfig(rank=int(rank), alpha=cfg.get("lora_alpha", 8), dropout=float(cfg.get("lora_dropout", 0.0)),
                      targets=tuple(_TARGET_OF[w] for w in found), rslora=bool(cfg.get("use_rslora", False)))

    layers: dict = {}
    for (part, name), ab in found.items():
        _, k, n = _weight_shape(config, part, name)
        a = np.zeros((config.n_layers, k, lora.rank), np.float32)
        b = np.zeros((config.n_layers, lora.rank, n), np.float32)
        for which, dst, want in (("A", a, (lora.rank, k)), ("B", b, (n, lora.rank))):
            for i, v in ab.get(which, {}).items():
                if v.shape != want:
                    raise AdapterError(f"{weights_path}: {_peft_name(part, name, i, which)} has shape "
                                       f"{v.shape}; this model needs {want}")
                dst[i] = v.T
        if set(ab.get("A", {})) != set(ab.get("B", {})):
            raise AdapterError(f"{weights_path}: {_MODULE[(part, name)]} has lora_A and lora_B for different layers")
        layers.setdefault(part, {})[name] = {"a": a, "b": b}
    return lora, {"layers": layers}


def merged_params(params: dict, config: LlamaConfig, directory: str | os.PathLike, *, dtype=None) -> dict:
    """The stored-layout parameters with the adapter of `directory` (PEFT's format) merged in, as
    `merge` (dtype: a quantized weight's, once merged): what `llama_jax.load(base, lora=directory)` runs."""
    lora, adapters = read(directory, config)
    return merge(params, adapters, lora, dtype=dtype)


__all__ = ["AdapterError", "DEFAULT_TARGETS", "LoraConfig", "TARGETS", "bank", "dropout_keys", "init", "merge",
           "merged_params", "nbytes", "read", "shapes", "shardings", "stored", "to_peft_state_dict", "view", "wrap",
           "wrap_rows", "write_peft"]
