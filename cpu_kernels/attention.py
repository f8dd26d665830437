"""Attention on the CPU: `attention` (causal GQA, forward and backward, FlashAttention-2 style) and
`decode_attention` and `paged_decode_attention` (flash-decoding over a KV cache, contiguous or paged).

- `attention`: per (sequence, kv head, block) on XLA's thread pool, MKL GEMMs on an L2-resident tile
  and one pass of mask, max and exp between them (what torch's CPU flash kernel does). XLA's blocked
  attention (pallas_kernels.blocked_attention) spends 1.5-2x torch's time per score: each softmax
  step is its own XLA op over the tile. The backward is FlashAttention-2's two passes from the
  forward's log-sum-exp.
- `decode_attention`: one query per head over a KV cache, each sequence's keys split into chunks
  over the threads `matvec` spins (flash-decoding); XLA's blocked loop ran at half its speed.
The references are pallas_kernels' `flash_attention_reference` and `decode_attention_reference`;
their contracts are the same (f32 here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels._library import ATTENTION, ATTENTION_BWD, DECODE_ATTENTION, require
from pallas_kernels import MASK_VALUE, normalize_masks, sm_scale_or_default

# Query positions per work item (times G rows) and keys per tile: the (128 * G, 128) f32 score
# tile stays in L2.
BLOCK_Q, BLOCK_K = 128, 128


def _attention_call(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks):
    require()
    B, T, H, _ = q.shape
    K = k.shape[2]
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, K, T * (H // K)), jnp.float32))
    return jax.ffi.ffi_call(ATTENTION, out, vmap_method="sequential")(
        q, k, v, q_off, kv_len, q_seg, kv_seg, causal=causal, sm_scale=np.float32(sm_scale),
        lse_empty=np.float32(-MASK_VALUE), block_q=np.int64(blocks[0]), block_k=np.int64(blocks[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks):
    return _attention_call(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks)[0]


def _attention_fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks):
    o, lse = _attention_call(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks)
    return o, (q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse)


def _attention_bwd(causal, sm_scale, blocks, res, do):
    q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse = res
    B, T, H, E = q.shape
    K = k.shape[2]
    # rowsum(o * do) per (kv head, t, g) row, in lse's layout.
    delta = jnp.sum(o * do, axis=-1).reshape(B, T, K, H // K).transpose(0, 2, 1, 3).reshape(B, K, -1)
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
           jax.ShapeDtypeStruct(v.shape, jnp.float32))
    dq, dk, dv = jax.ffi.ffi_call(ATTENTION_BWD, out, vmap_method="sequential")(
        q, k, v, do.astype(jnp.float32), lse, delta, q_off, kv_len, q_seg, kv_seg, causal=causal,
        sm_scale=np.float32(sm_scale), block_q=np.int64(blocks[0]), block_k=np.int64(blocks[1]))
    return dq, dk, dv, None, None, None, None  # the int inputs have no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, q_segment_ids=None,
              kv_segment_ids=None, sm_scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """`pallas_kernels.blocked_attention`'s function and contract (q [B, T, H, E], k, v [B, S, K, E],
    f32; a query that sees no key gets 0), forward and backward by the CPU kernel."""
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"{H=} query heads is not a multiple of {K=} kv heads")
    q_off, kv_len, q_seg, kv_seg = normalize_masks(B, T, S, q_offset, kv_lengths, q_segment_ids, kv_segment_ids)
    if T == 0 or S == 0:
        return jnp.zeros_like(q)
    if q_seg is None:  # no documents: empty segment ids, which the kernel reads as none
        q_seg = kv_seg = jnp.zeros((B, 0), jnp.int32)
    return _attention(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale_or_default(sm_scale, E),
                      (block_q, block_k))


def decode_attention(q, k_cache, v_cache, *, lengths, sm_scale=None):
    """`pallas_kernels.blocked_decode_attention`'s function and contract (q [B, H, E] over the first
    lengths[b] keys of k_cache, v_cache [B, S, K, E], f32; no keys give 0), forward only: each
    sequence's keys split into chunks over the spinning threads. The cache is read as a paged one
    of one page per sequence."""
    B = q.shape[0]
    tables = jnp.arange(B, dtype=jnp.int32)[:, None]
    return paged_decode_attention(q, k_cache, v_cache, tables, lengths, sm_scale=sm_scale)


def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None):
    """`pallas_kernels.paged_decode_attention`'s function and contract (q [B, H, E] over the first
    lengths[b] keys of a pool k_pages, v_pages [P, page_size, K, E] read through block_tables
    [B, max_pages], f32), forward only, as `decode_attention`."""
    require()
    B, H, E = q.shape
    if H % k_pages.shape[2]:
        raise ValueError(f"H={H} query heads is not a multiple of K={k_pages.shape[2]} kv heads")
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (B,))
    return jax.ffi.ffi_call(DECODE_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths,
        sm_scale=np.float32(sm_scale_or_default(sm_scale, E)))
