"""Decode attention (one new query per sequence against a KV cache) as a Pallas Triton kernel.

Flash-decoding (Dao et al., 2023): with one query per sequence there are only B * K
(batch, kv head) pairs, too few to fill a GPU, so the keys are also split into `num_splits`
chunks. Each program handles the G query heads that share one kv head against one chunk and
writes a partial, normalized output and its log-sum-exp; a small jnp merge combines them.
Key blocks past lengths[b] are never loaded.

Backend: Triton (see `_common`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (LOG2E, MASK_VALUE, by_platform, dot, merge_splits, next_pow2,
                                    pad_axis, round_up, sm_scale_or_default, softmax_finish, softmax_init,
                                    softmax_step, triton_params)


def _decode_kernel(length_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale, block_k,
                   blocks_per_split):
    # q_ref (G, E) for one (batch, kv head); k_ref, v_ref (S, E): that head's whole cache.
    split = pl.program_id(2)
    length = length_ref[()]
    q = q_ref[...]
    scale = sm_scale * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))
    start = split * blocks_per_split
    stop = jnp.minimum(start + blocks_per_split, lax.div(length + block_k - 1, block_k))
    # Blocks wholly below `length` need no mask; only the last one is ragged.
    n_full = jnp.clip(lax.div(length, block_k), start, jnp.maximum(stop, start))

    def body(j, carry, masked):
        ks = pl.ds(j * block_k, block_k)
        s = dot(q, k_ref[ks, :], trans_b=True) * scale  # (G, block_k) f32
        mask = (j * block_k + jnp.arange(block_k) < length)[None, :] if masked else None
        return softmax_step(carry, s, lambda: v_ref[ks, :], mask)

    carry = softmax_init(*q.shape)
    carry = lax.fori_loop(start, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, stop, functools.partial(body, masked=True), carry)
    o, lse, empty = softmax_finish(carry)
    o_ref[...] = o
    lse_ref[...] = jnp.where(empty, MASK_VALUE, lse)  # a split wholly past `length`: weight 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_k: keys per loop step; num_splits: key chunks per (batch, kv head)."""

    block_k: int = 128
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, seq_len: int, batch_kv_heads: int = 1) -> "BlockSizes":
        block_k = min(128, max(16, next_pow2(seq_len)))
        num_blocks = -(-seq_len // block_k)
        # Aim for about 1024 programs (several waves on a 132-SM H100) but keep each split
        # at least 4 blocks long, so the merge stays cheap next to the cache read.
        num_splits = max(1, min(1024 // max(batch_kv_heads, 1), num_blocks // 4))
        return cls(block_k=block_k, num_splits=next_pow2(num_splits + 1) // 2)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def decode_attention(q, k_cache, v_cache, *, lengths, sm_scale=None, block_sizes=None,
                     interpret=None):
    """Attention of one new query per sequence over a KV cache (GQA, ragged lengths).

    Args:
      q: [B, H, E] queries.
      k_cache, v_cache: [B, S, K, E], H % K == 0; no copy is made when S is a multiple of 16
        and E a power of two (otherwise the cache is padded, a copy).
      lengths: int32 [B], valid keys per sequence (keys at index >= lengths[b] are ignored;
        0 gives a zero output).
      sm_scale: logit scale, default 1 / sqrt(E).
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(S, B * K)`.
      interpret: run the Pallas interpreter; None: the interpreter when lowered for CPU, the
        compiled kernel when lowered for a GPU.

    Returns:
      [B, H, E] in q.dtype.
    """
    B, H, E = q.shape
    _, S, K, _ = k_cache.shape
    G = H // K
    sm_scale = sm_scale_or_default(sm_scale, E)
    bs = block_sizes or BlockSizes.get_default(S, B * K)
    # block_k must divide the (padded) cache length so no load runs past its end.
    s_pad = round_up(S, 16)
    block_k = min(bs.block_k, s_pad & -s_pad)  # largest power of two dividing s_pad
    num_blocks = s_pad // block_k
    blocks_per_split = -(-num_blocks // min(bs.num_splits, num_blocks))
    num_splits = -(-num_blocks // blocks_per_split)
    # Triton tiles are powers of two, and tl.dot needs at least 16 rows: pad the (tiny)
    # query group; E is padded only if it is not a power of two.
    g_pad, e_pad = max(16, next_pow2(G)), next_pow2(E)
    q4 = pad_axis(pad_axis(q.reshape(B, K, G, E), 2, g_pad), 3, e_pad)  # (B, K, Gp, Ep)
    k_cache = pad_axis(pad_axis(k_cache, 1, s_pad), 3, e_pad)  # (B, Sp, K, Ep)
    v_cache = pad_axis(pad_axis(v_cache, 1, s_pad), 3, e_pad)
    lengths = jnp.clip(jnp.broadcast_to(lengths, (B,)).astype(jnp.int32), 0, S)

    def kernel(interp, *args):
        return pl.pallas_call(
            functools.partial(_decode_kernel, sm_scale=sm_scale, block_k=block_k,
                              blocks_per_split=blocks_per_split),
            grid=(B, K, num_splits),
            in_specs=[
                pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, None, g_pad, e_pad), lambda b, h, s: (b, h, 0, 0)),
                pl.BlockSpec((None, s_pad, None, e_pad), lambda b, h, s: (b, 0, h, 0)),
                pl.BlockSpec((None, s_pad, None, e_pad), lambda b, h, s: (b, 0, h, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, g_pad, e_pad), lambda b, h, s: (b, h, s, 0, 0)),
                pl.BlockSpec((None, None, None, g_pad), lambda b, h, s: (b, h, s, 0)),
            ],
            out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, g_pad, e_pad), jnp.float32),
                       jax.ShapeDtypeStruct((B, K, num_splits, g_pad), jnp.float32)],
            compiler_params=triton_params(bs.num_warps, bs.num_stages),
            interpret=interp,
            name="decode_attention",
        )(*args)
    o, lse = by_platform(kernel, interpret, lengths, q4, k_cache, v_cache)

    o = merge_splits(o, lse)  # (B, K, Gp, Ep)
    return o[:, :, :G, :E].reshape(B, H, E).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def decode_attention_reference(q, k_cache, v_cache, *, lengths, sm_scale=None):
    """Plain-jnp decode attention; same contract as `decode_attention`.

    GQA is a reshape of q to (B, K, G, E); the cache is read once, never repeated. Logits and
    softmax are f32; probabilities are cast to the cache dtype for the value matmul (as flash
    kernels do), accumulating in f32.
    """
    B, H, E = q.shape
    _, S, K, _ = k_cache.shape
    sm_scale = sm_scale_or_default(sm_scale, E)
    q4 = q.reshape(B, K, H // K, E)  # (B, K, G, E)
    s = jnp.einsum("BKGE,BSKE->BKGS", q4, k_cache, preferred_element_type=jnp.float32) * sm_scale
    valid = (jnp.arange(S)[None, :] < jnp.reshape(lengths, (-1, 1)))[:, None, None, :]  # (B,1,1,S)
    s = jnp.where(valid, s, -jnp.inf)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no key: keep exp(-inf - 0) = 0
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)  # (B, K, G)
    o = jnp.einsum("BKGS,BSKE->BKGE", p.astype(v_cache.dtype), v_cache,
                   preferred_element_type=jnp.float32)
    o = o / jnp.where(l == 0.0, 1.0, l)[..., None]
    return o.reshape(B, H, E).astype(q.dtype)
