"""The public entry points: `load` and the `Llama` handle."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.checkpoint import read_hf_params
from llama_jax.config import LlamaConfig
from llama_jax.model import Transformer, default_dtype


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, tokens):
    logits, _ = nnx.merge(graphdef, state)(tokens)
    return logits


class Llama:
    """A loaded model: `config`, `logits(token_ids)`; generation arrives with the generate module."""

    def __init__(self, model: Transformer, *, unstack_layers: bool = True):
        if unstack_layers:
            model.unstack_layers()
        self.config: LlamaConfig = model.config
        # Split once: the jitted hot paths take this pure state, so nothing re-traces per call.
        self._graphdef, self._state = nnx.split(model)

    @property
    def model(self) -> Transformer:
        return nnx.merge(self._graphdef, self._state)

    def _check_ids(self, token_ids, what="token_ids") -> np.ndarray:
        if not len(token_ids) or any(not len(row) for row in token_ids):
            raise ValueError(f"{what}: empty batch or empty sequence")
        if len({len(row) for row in token_ids}) != 1:
            raise ValueError(f"{what}: sequences must have equal lengths, got {sorted({len(r) for r in token_ids})}")
        ids = np.asarray(token_ids)
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{what}: token ids must be integers")
        bad = ids[(ids < 0) | (ids >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"{what}: token id {int(bad[0])} outside the vocabulary [0, {self.config.vocab_size})")
        if ids.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{what}: length {ids.shape[1]} exceeds the context ({self.config.max_seq_len})")
        return ids.astype(np.int32)

    def logits(self, token_ids) -> np.ndarray:
        """Full-sequence logits: token_ids, a batch of equal-length lists of ids [B, T] ->
        float32 numpy array [B, T, V]."""
        ids = self._check_ids(token_ids)
        return np.asarray(_logits(self._graphdef, self._state, jnp.asarray(ids)))


def load(path: str | os.PathLike, *, dtype=None, attention_impl: str = "auto", norm_impl: str = "auto",
         unstack_layers: bool = True) -> Llama:
    """Loads a Hugging Face model directory (config.json with model.safetensors, or shards with
    model.safetensors.index.json). dtype: parameter and compute dtype ("float32" or "bfloat16");
    None picks float32 on CPU and bfloat16 on GPU."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such model directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face model directory)")
    dtype = jnp.dtype(dtype or default_dtype()).name
    config = LlamaConfig.from_hf(path, param_dtype=dtype, dtype=dtype,
                                 attention_impl=attention_impl, norm_impl=norm_impl)
    params = read_hf_params(path, config, np.dtype(jnp.dtype(dtype)))
    return Llama(_build(config, params), unstack_layers=unstack_layers)


def _build(config: LlamaConfig, params: dict) -> Transformer:
    """A Transformer whose parameters are `params` (a nested dict of arrays), with no random init."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def from_config(config: LlamaConfig, *, seed: int = 0, unstack_layers: bool = True) -> Llama:
    """A randomly initialized model (for tests and benchmarks)."""
    return Llama(Transformer(config, rngs=nnx.Rngs(seed)), unstack_layers=unstack_layers)


__all__ = ["Llama", "load", "from_config"]
