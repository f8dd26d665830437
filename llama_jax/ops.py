"""One function per phase, dispatching to the Pallas kernels or to their pure-jnp references.

`impl` is fixed at load time: "auto" is pallas on GPU and xla elsewhere; on CPU "pallas" runs the
kernels in interpret mode (slow, for tests). "cudnn" is jax.nn.dot_product_attention's cuDNN path.
Under a mesh (`jax.set_mesh`), a Pallas kernel runs per device inside `jax.shard_map` over the local
batch and heads; the XLA paths follow the shardings of their inputs.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

import pallas_kernels as pk


def resolve(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("attention_impl='cudnn' needs a GPU (use 'xla' or 'pallas')")
    return impl


def _per_device(fn, in_specs, out_specs):
    """fn as is without a mesh; under one, mapped over the local shards (kernels see local shapes)."""
    if jax.sharding.get_abstract_mesh().empty:
        return fn
    # check_vma=False: Pallas calls do not declare how their outputs vary over the mesh.
    return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)


_HEADS = P("data", None, "model", None)  # [B, T|S, H|K, E]
_ROWS = P("data", None, None)  # [B, T, D]


def rms_norm(x, weight, residual=None, *, eps, impl="auto"):
    """RMSNorm of x [B, T, D] (or of h = x + residual, returning (normed, h)), f32 statistics."""
    if resolve(impl) != "pallas":
        return pk.rms_norm_reference(x, weight, residual, eps=eps)
    kernel = functools.partial(pk.rms_norm, eps=eps)
    if residual is None:
        return _per_device(lambda x, w: kernel(x, w), (_ROWS, P(None)), _ROWS)(x, weight)
    return _per_device(kernel, (_ROWS, P(None), _ROWS), (_ROWS, _ROWS))(x, weight, residual)


def prefill_attention(q, k, v, *, lengths=None, impl="auto"):
    """Causal attention of q [B, T, H, E] over k, v [B, T, K, E] -> [B, T, H, E]. lengths [B]:
    valid tokens per (right-padded) row; keys past them are masked."""
    impl = resolve(impl)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if impl == "xla":
        return pk.flash_attention_reference(q, k, v, causal=True, kv_lengths=lengths)
    if lengths is None:
        return _per_device(lambda q, k, v: pk.flash_attention(q, k, v, causal=True),
                           (_HEADS,) * 3, _HEADS)(q, k, v)
    kernel = lambda q, k, v, n: pk.flash_attention(q, k, v, causal=True, kv_lengths=n)  # noqa: E731
    return _per_device(kernel, (_HEADS,) * 3 + (P("data"),), _HEADS)(q, k, v, lengths)


def decode_attention(q, k_cache, v_cache, *, lengths, impl="auto"):
    """One query per sequence q [B, H, E] over the first lengths[b] keys of the cache
    [B, S, K, E] -> [B, H, E]."""
    impl = resolve(impl)
    if impl == "cudnn":
        out = jax.nn.dot_product_attention(q[:, None], k_cache, v_cache, key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return out[:, 0]
    if impl == "xla":
        return pk.decode_attention_reference(q, k_cache, v_cache, lengths=lengths)
    kernel = lambda q, k, v, n: pk.decode_attention(q, k, v, lengths=n)  # noqa: E731
    specs = (P("data", "model", None), _HEADS, _HEADS, P("data"))
    return _per_device(kernel, specs, P("data", "model", None))(q, k_cache, v_cache, lengths)
