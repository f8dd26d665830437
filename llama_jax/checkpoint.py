"""Hugging Face checkpoints: the name table from their tensor names to our stacked parameters.

Ours: linear weights [in, out] with a leading layer axis L; Hugging Face: [out, in], one tensor per
layer. Hugging Face's q/k projections are already permuted for the split-halves RoPE we use, so no
un-permute is needed (Meta's original `consolidated.pth` files would need one; we read only HF).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.safetensors_io import SafetensorsFile

# Our parameter path -> (Hugging Face name, transform from theirs to ours). "{i}": the layer index.
_T = np.transpose
LAYER_TABLE: dict[tuple[str, ...], tuple[str, Callable | None]] = {
    ("attention_norm", "weight"): ("model.layers.{i}.input_layernorm.weight", None),
    ("attention", "wq"): ("model.layers.{i}.self_attn.q_proj.weight", _T),
    ("attention", "wk"): ("model.layers.{i}.self_attn.k_proj.weight", _T),
    ("attention", "wv"): ("model.layers.{i}.self_attn.v_proj.weight", _T),
    ("attention", "wo"): ("model.layers.{i}.self_attn.o_proj.weight", _T),
    ("ffn_norm", "weight"): ("model.layers.{i}.post_attention_layernorm.weight", None),
    ("feed_forward", "w1"): ("model.layers.{i}.mlp.gate_proj.weight", _T),
    ("feed_forward", "w3"): ("model.layers.{i}.mlp.up_proj.weight", _T),
    ("feed_forward", "w2"): ("model.layers.{i}.mlp.down_proj.weight", _T),
}
GLOBAL_TABLE: dict[tuple[str, ...], tuple[str, Callable | None]] = {
    ("tok_embeddings",): ("model.embed_tokens.weight", None),
    ("norm", "weight"): ("model.norm.weight", None),
    ("output",): ("lm_head.weight", _T),
}
# Tensors some checkpoints carry that we recompute: never an error.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    pass


def param_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our parameter paths and shapes (layer kinds with their leading L)."""
    c = config
    d, f, q, kv, L = c.dim, c.ffn_dim, c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_layers
    shapes = {
        ("tok_embeddings",): (c.vocab_size, d),
        ("layers", "attention_norm", "weight"): (L, d),
        ("layers", "attention", "wq"): (L, d, q),
        ("layers", "attention", "wk"): (L, d, kv),
        ("layers", "attention", "wv"): (L, d, kv),
        ("layers", "attention", "wo"): (L, q, d),
        ("layers", "ffn_norm", "weight"): (L, d),
        ("layers", "feed_forward", "w1"): (L, d, f),
        ("layers", "feed_forward", "w3"): (L, d, f),
        ("layers", "feed_forward", "w2"): (L, f, d),
        ("norm", "weight"): (d,),
    }
    if not c.tie_embeddings:
        shapes[("output",)] = (d, c.vocab_size)
    return shapes


class HFCheckpoint:
    """The safetensors files of a Hugging Face model directory, single or sharded with an index."""

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = os.fspath(model_dir)
        index = os.path.join(self.dir, "model.safetensors.index.json")
        single = os.path.join(self.dir, "model.safetensors")
        if os.path.isfile(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
            for shard in sorted(set(weight_map.values())):
                if not os.path.isfile(os.path.join(self.dir, shard)):
                    raise CheckpointError(f"{index}: names shard {shard!r}, which is missing")
        elif os.path.isfile(single):
            weight_map = None
        else:
            pickles = [n for n in os.listdir(self.dir) if n.endswith((".bin", ".pth", ".pt"))]
            if pickles:
                raise CheckpointError(
                    f"{self.dir}: only pickle checkpoints ({', '.join(sorted(pickles))}); we never unpickle "
                    "weights: convert them to safetensors first")
            raise CheckpointError(f"{self.dir}: no model.safetensors or model.safetensors.index.json")
        self._files: dict[str, SafetensorsFile] = {}
        if weight_map is None:
            f = self._file("model.safetensors")
            self.weight_map = {name: "model.safetensors" for name in f.names}
        else:
            self.weight_map = dict(weight_map)
            for shard in sorted(set(weight_map.values())):  # every name the index promises is there
                missing = [n for n, s in weight_map.items() if s == shard and n not in self._file(shard).names]
                if missing:
                    raise CheckpointError(f"{os.path.join(self.dir, shard)}: tensor {missing[0]!r} listed in the "
                                          "index is not in the file")

    def _file(self, shard: str) -> SafetensorsFile:
        if shard not in self._files:
            self._files[shard] = SafetensorsFile(os.path.join(self.dir, shard))
        return self._files[shard]

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(self.weight_map[name]).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(self.weight_map[name]).get(name)

    def where(self, name: str) -> str:
        return os.path.join(self.dir, self.weight_map[name])

    def shards(self) -> list[str]:
        """Shard file names in the order their tensors are best read (file order)."""
        return sorted(set(self.weight_map.values()))


def _expected(config: LlamaConfig) -> dict[str, tuple[tuple[str, ...], int | None, Callable | None, tuple]]:
    """Hugging Face name -> (our path, layer index or None, transform, our per-layer shape)."""
    shapes = param_shapes(config)
    out = {}
    for path, (name, fn) in GLOBAL_TABLE.items():
        if path in shapes:
            out[name] = (path, None, fn, shapes[path])
    for path, (name, fn) in LAYER_TABLE.items():
        shape = shapes[("layers", *path)][1:]
        for i in range(config.n_layers):
            out[name.format(i=i)] = (("layers", *path), i, fn, shape)
    return out


def iter_hf_tensors(ckpt: HFCheckpoint, config: LlamaConfig, *, allow_extra: bool = False
                    ) -> Iterator[tuple[tuple[str, ...], int | None, np.ndarray]]:
    """Yields (our path, layer index or None, array in our layout) one tensor at a time, in file
    order, after checking that every tensor is present with its expected shape."""
    expected = _expected(config)
    missing = [n for n in expected if n not in ckpt]
    if missing:
        raise CheckpointError(f"{ckpt.dir}: missing tensor {missing[0]!r}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name in ckpt.weight_map:
        if name in expected or name.endswith(_IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # some tied checkpoints store the head anyway; it equals the embedding
        if not allow_extra:
            raise CheckpointError(f"{ckpt.where(name)}: unexpected tensor {name!r}")
    for name, (path, layer, fn, shape) in expected.items():
        theirs = tuple(reversed(shape)) if fn is _T else shape
        if ckpt.shape(name) != theirs:
            raise CheckpointError(f"{ckpt.where(name)}: tensor {name!r} has shape {ckpt.shape(name)}, "
                                  f"expected {theirs}")
    order = {s: i for i, s in enumerate(ckpt.shards())}
    for name in sorted(expected, key=lambda n: order[ckpt.weight_map[n]]):
        path, layer, fn, _ = expected[name]
        a = ckpt.get(name)
        yield path, layer, (fn(a) if fn is not None else a)


def read_hf_params(model_dir: str | os.PathLike, config: LlamaConfig, dtype, *,
                   allow_extra: bool = False) -> dict:
    """All parameters as a nested dict of numpy arrays in `dtype`, layers stacked on axis 0."""
    ckpt = HFCheckpoint(model_dir)
    shapes = param_shapes(config)
    flat = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    for path, layer, a in iter_hf_tensors(ckpt, config, allow_extra=allow_extra):
        if layer is None:
            flat[path][...] = a
        else:
            flat[path][layer] = a
    return unflatten(flat)


def unflatten(flat: dict[tuple[str, ...], np.ndarray]) -> dict:
    tree: dict = {}
    for path, a in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = a
    return tree


def to_hf_state_dict(tree: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    """Hugging Face names and layouts ([out, in], one tensor per layer) of any parameter-shaped tree:
    weights, gradients or optimizer moments, as a nested dict like `read_hf_params` returns (layers
    stacked on axis 0; numpy or jax arrays; an nnx.State's pure dict works too). Returns numpy
    arrays in the tree's dtype; a tied model has no lm_head.weight (transformers ties it itself)."""
    shapes = param_shapes(config)
    flat = {}
    for path, shape in shapes.items():
        node = tree
        try:
            for key in path:
                node = node[key]
        except (KeyError, TypeError):
            raise CheckpointError(f"to_hf_state_dict: the tree has no {'/'.join(path)}") from None
        a = np.asarray(node)
        if a.shape != shape:
            raise CheckpointError(f"to_hf_state_dict: {'/'.join(path)} has shape {a.shape}, expected {shape}")
        flat[path] = a
    out = {}
    for path, (name, fn) in GLOBAL_TABLE.items():
        if path in flat:  # _T is its own inverse
            a = flat[path]
            out[name] = np.ascontiguousarray(fn(a) if fn is not None else a)
    for path, (name, fn) in LAYER_TABLE.items():
        stacked = flat[("layers", *path)]
        for i in range(config.n_layers):
            a = stacked[i]
            out[name.format(i=i)] = np.ascontiguousarray(fn(a) if fn is not None else a)
    return out


def hf_config_dict(config: LlamaConfig, *, dtype: str = "float32") -> dict:
    """A transformers `config.json` (LlamaForCausalLM) for `config`; `LlamaConfig.from_hf` reads it back."""
    c = config
    rope = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling is not None:
        s = c.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": c.rope_theta, "factor": s.factor,
                "low_freq_factor": s.low_freq_factor, "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    eos = list(c.eos_ids)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": c.vocab_size,
        "hidden_size": c.dim,
        "intermediate_size": c.ffn_dim,
        "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads,
        "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_seq_len,
        "rms_norm_eps": c.norm_eps,
        # transformers 5 reads rope_parameters; older versions rope_theta and rope_scaling.
        "rope_parameters": rope,
        "rope_theta": c.rope_theta,
        "rope_scaling": None if c.rope_scaling is None else {k: v for k, v in rope.items() if k != "rope_theta"},
        "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": c.bos_id,
        "eos_token_id": None if not eos else eos[0] if len(eos) == 1 else eos,
        "torch_dtype": dtype,
        "dtype": dtype,
    }
