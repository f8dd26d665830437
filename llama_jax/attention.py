"""Dispatch between the Pallas kernels and their pure-jnp references (the XLA path), per phase.

`impl` is fixed at load time: "auto" is pallas on GPU and xla elsewhere; on CPU "pallas" runs the
kernels in interpret mode (slow, for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve(impl: str) -> str:
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    return impl


def rms_norm(x, weight, residual=None, *, eps, impl="auto"):
    """RMSNorm of x [..., D] (or of h = x + residual, returning (normed, h)), f32 statistics."""
    h = x if residual is None else (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)
    h32 = h.astype(jnp.float32)
    normed = h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    # Cast back before the weight, as Hugging Face's LlamaRMSNorm does.
    y = (normed.astype(x.dtype) * weight).astype(x.dtype)
    return y if residual is None else (y, h)


def prefill_attention(q, k, v, *, lengths=None, impl="auto"):
    """Causal attention of q [B, T, H, E] over k, v [B, T, K, E] -> [B, T, H, E]."""
    b, t, h, e = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, h // kh, e)  # (B, T, K, G, E)
    s = jnp.einsum("BTKGE,BSKE->BKGTS", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(e).astype(jnp.float32)
    mask = jnp.tril(jnp.ones((t, k.shape[1]), bool), k.shape[1] - t)
    s = jnp.where(mask, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("BKGTS,BSKE->BTKGE", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, e).astype(q.dtype)


def decode_attention(q, k_cache, v_cache, *, lengths, impl="auto"):
    """One query per sequence q [B, H, E] over the first lengths[b] keys of the cache -> [B, H, E]."""
    b, h, e = q.shape
    kh = k_cache.shape[2]
    qg = q.reshape(b, kh, h // kh, e)  # (B, K, G, E)
    s = jnp.einsum("BKGE,BSKE->BKGS", qg, k_cache, preferred_element_type=jnp.float32) / jnp.sqrt(e).astype(jnp.float32)
    valid = jnp.arange(k_cache.shape[1])[None, :] < lengths[:, None]  # (B, S)
    s = jnp.where(valid[:, None, None, :], s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    out = jnp.einsum("BKGS,BSKE->BKGE", p.astype(v_cache.dtype), v_cache, preferred_element_type=jnp.float32)
    return out.reshape(b, h, e).astype(q.dtype)
