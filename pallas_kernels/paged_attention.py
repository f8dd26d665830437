"""Decode attention over a paged KV cache (PagedAttention, Kwon et al., 2023; issue #23).

The cache is a pool of fixed-size pages shared by every sequence, [P, page_size, K, E]; each
sequence owns a block table, the pool indices of its pages in order. Token t of sequence b lives
at k_pages[block_tables[b, t // page_size], t % page_size]. Pages need not be contiguous or
private: two sequences with a common prompt may point at the same pages.

The kernel is `decode_attention`'s flash-decoding with one change: where that kernel slices key
block j of the cache, this one first loads entries j * n ... j * n + n - 1 of the sequence's block
table (n = pages_per_step) and gathers those n pages from the pool, a (n * page_size, E) tile.
So the table drives every load, as a scalar-prefetch index map would. Each program handles the G
query heads of one (sequence, kv head) against one split of the table and writes a partial,
normalized output and its log-sum-exp; a small jnp merge combines the splits. Steps past
lengths[b] are never loaded.

Backend: Triton (see `_common`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (LOG2E, MASK_VALUE, by_platform, dot, merge_splits, next_pow2,
                                    pad_axis, sm_scale_or_default, softmax_finish, softmax_init,
                                    softmax_step, triton_params)


def _paged_kernel(length_ref, table_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, sm_scale,
                  pages_per_step, steps_per_split, q_len, heads):
    # q_ref (rows, E) for one (sequence, kv head): q_len positions x `heads` query heads, position
    # major, padded; table_ref (max_pages,): that sequence's block table; k_ref, v_ref
    # (P, page_size, E): that kv head's slice of the whole pool.
    split = pl.program_id(2)
    length = length_ref[()]
    q = q_ref[...]
    page_size, e = k_ref.shape[1], k_ref.shape[2]
    block_k = pages_per_step * page_size
    scale = sm_scale * LOG2E  # softmax in base 2: exp(x) = exp2(x * log2(e))
    start = split * steps_per_split
    stop = jnp.minimum(start + steps_per_split, lax.div(length + block_k - 1, block_k))
    # Row r is the query at position length - q_len + r // heads: it sees the keys up to its own.
    row_length = length - q_len + 1 + jnp.minimum(jnp.arange(q.shape[0]) // heads, q_len - 1)  # (rows,)
    # Steps wholly below the first query's length need no mask; only the last ones are ragged.
    n_full = jnp.clip(lax.div(length - q_len + 1, block_k), start, jnp.maximum(stop, start))

    def body(j, carry, masked):
        pages = table_ref[pl.ds(j * pages_per_step, pages_per_step)]  # (n,) pool indices
        k = k_ref[pages].reshape(block_k, e)  # (n, page_size, E) gathered -> (block_k, E)
        s = dot(q, k, trans_b=True) * scale  # (G, block_k) f32
        if not masked:
            return softmax_step(carry, s, lambda: v_ref[pages].reshape(block_k, e))
        keys = j * block_k + jnp.arange(block_k)  # (block_k,)
        valid = keys < length
        # Slots past `length` (the rest of the last page, pages the table does not own yet)
        # may hold anything, NaN included: p = 0 does not cancel a NaN in v, so zero them.
        def load_v():
            return jnp.where(valid[:, None], v_ref[pages].reshape(block_k, e), 0)
        return softmax_step(carry, s, load_v, keys[None, :] < row_length[:, None])

    carry = softmax_init(*q.shape)
    carry = lax.fori_loop(start, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, stop, functools.partial(body, masked=True), carry)
    o, lse, empty = softmax_finish(carry)
    o_ref[...] = o
    lse_ref[...] = jnp.where(empty, MASK_VALUE, lse)  # a split wholly past `length`: weight 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """pages_per_step: pages gathered per loop step (a power of two; the key tile is
    pages_per_step * page_size); num_splits: table chunks per (sequence, kv head)."""

    pages_per_step: int = 8
    num_splits: int = 16
    num_warps: int = 4
    num_stages: int = 2

    @classmethod
    def get_default(cls, page_size: int, max_pages: int, head_dim: int,
                    batch_kv_heads: int = 1) -> "BlockSizes":
        # 128 keys per step, as `decode_attention`'s block_k (8 pages of 16); fewer when the
        # table is shorter, so a short table is not padded to 128 keys.
        pages_per_step = min(max(1, 128 // page_size), next_pow2(max_pages))
        # A (128, 128) tile gathered from pages costs each thread far more registers than the
        # same tile sliced from a contiguous cache (ptxas: near the 255 limit with 4 warps;
        # docs/GPU_COMPILE.md). 8 warps halve each thread's share at the same shared memory:
        # as many programs per SM, twice the warps in flight to hide the loads.
        num_warps = 8 if head_dim * pages_per_step * page_size >= 128 * 128 else 4
        num_steps = -(-max_pages // pages_per_step)
        # As `decode_attention`: about 1024 programs (several waves on a 132-SM H100), but each
        # split at least 4 steps long, so the merge stays cheap next to the cache read.
        num_splits = max(1, min(1024 // max(batch_kv_heads, 1), num_steps // 4))
        return cls(pages_per_step=pages_per_step, num_splits=next_pow2(num_splits + 1) // 2,
                   num_warps=num_warps)


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_sizes", "interpret"))
def paged_decode_attention(q, k_pages, v_pages, block_tables, lengths, *, sm_scale=None,
                           block_sizes=None, interpret=None):
    """Attention of the newest queries of each sequence over a paged KV cache (GQA, ragged
    lengths): one per sequence in a decode step, or the last T positions of each (speculative
    decoding's verify), every page read once for all T.

    Args:
      q: [B, H, E] queries, one per sequence, or [B, T, H, E]: query t of sequence b is at
        position lengths[b] - T + t and sees the keys up to its own (causal).
      k_pages, v_pages: [P, page_size, K, E], the page pool; H % K == 0, page_size a power of
        two. No copy is made when E is a power of two (otherwise the pool is padded, a copy).
      block_tables: int32 [B, max_pages], the pool index of each sequence's pages in order.
        Entries past a sequence's pages are ignored but must lie in [0, P) (they may be loaded).
      lengths: int32 [B], keys per sequence: its first lengths[b] tokens (clipped to
        max_pages * page_size; 0 gives a zero output).
      sm_scale: logit scale, default 1 / sqrt(E).
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(page_size, max_pages, E, B * K)`.
      interpret: run the Pallas interpreter; None: the interpreter when lowered for CPU, the
        compiled kernel when lowered for a GPU.

    Returns:
      q's shape, in q.dtype.
    """
    T = 1 if q.ndim == 3 else q.shape[1]
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    _, page_size, K, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    if H % K or k_pages.shape != v_pages.shape or k_pages.shape[3] != E:
        raise ValueError(f"q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}: "
                         "need H % K == 0 and equal head dims")
    if page_size != next_pow2(page_size) or block_tables.shape[0] != B:
        raise ValueError(f"page_size {page_size} must be a power of two, block_tables "
                         f"{block_tables.shape} must have B = {B} rows")
    G = H // K
    sm_scale = sm_scale_or_default(sm_scale, E)
    # Each (sequence, kv head) program takes its T x G query rows (position major) at once.
    g_pad, e_pad = max(16, next_pow2(T * G)), next_pow2(E)
    bs = block_sizes or BlockSizes.get_default(page_size, max_pages, e_pad, B * K)
    # A power of two (a Triton tile of page indices), and at least 16 keys (tl.dot's minimum).
    pages_per_step = max(next_pow2(bs.pages_per_step), -(-16 // page_size))
    num_steps = max(1, -(-max_pages // pages_per_step))
    steps_per_split = -(-num_steps // min(bs.num_splits, num_steps))
    num_splits = -(-num_steps // steps_per_split)
    # The last step may read table entries past max_pages: pad with page 0 (masked anyway).
    tables = pad_axis(block_tables.astype(jnp.int32), 1, num_steps * pages_per_step)
    rows = q.reshape(B, T, K, G, E).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, E)
    q4 = pad_axis(pad_axis(rows, 2, g_pad), 3, e_pad)  # (B, K, Gp, Ep)
    k_pages = pad_axis(k_pages, 3, e_pad)  # (P, page_size, K, Ep)
    v_pages = pad_axis(v_pages, 3, e_pad)
    lengths = jnp.clip(jnp.broadcast_to(lengths, (B,)).astype(jnp.int32), 0, max_pages * page_size)
    P = k_pages.shape[0]

    def kernel(interp, *args):
        return pl.pallas_call(
            functools.partial(_paged_kernel, sm_scale=sm_scale, pages_per_step=pages_per_step,
                              steps_per_split=steps_per_split, q_len=T, heads=G),
            grid=(B, K, num_splits),
            in_specs=[
                pl.BlockSpec((None,), lambda b, h, s: (b,)),
                pl.BlockSpec((None, tables.shape[1]), lambda b, h, s: (b, 0)),
                pl.BlockSpec((None, None, g_pad, e_pad), lambda b, h, s: (b, h, 0, 0)),
                # The whole pool of kv head h: the kernel picks pages through the table.
                pl.BlockSpec((P, page_size, None, e_pad), lambda b, h, s: (0, 0, h, 0)),
                pl.BlockSpec((P, page_size, None, e_pad), lambda b, h, s: (0, 0, h, 0)),
            ],
            out_specs=[
                pl.BlockSpec((None, None, None, g_pad, e_pad), lambda b, h, s: (b, h, s, 0, 0)),
                pl.BlockSpec((None, None, None, g_pad), lambda b, h, s: (b, h, s, 0)),
            ],
            out_shape=[jax.ShapeDtypeStruct((B, K, num_splits, g_pad, e_pad), jnp.float32),
                       jax.ShapeDtypeStruct((B, K, num_splits, g_pad), jnp.float32)],
            compiler_params=triton_params(bs.num_warps, bs.num_stages),
            interpret=interp,
            name="paged_decode_attention",
        )(*args)
    o, lse = by_platform(kernel, interpret, lengths, tables, q4, k_pages, v_pages)

    o = merge_splits(o, lse)  # (B, K, Gp, Ep)
    o = o[:, :, :T * G, :E].reshape(B, K, T, G, E).transpose(0, 2, 1, 3, 4)
    return o.reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("sm_scale",))
def paged_decode_attention_reference(q, k_pages, v_pages, block_tables, lengths, *,
                                     sm_scale=None):
    """Plain-jnp paged decode attention; same contract as `paged_decode_attention`.

    Gathers each sequence's pages through its table into a contiguous [B, S, K, E] cache
    (S = max_pages * page_size, a copy: this is the yardstick, not a fast path), then a masked
    f32 softmax with GQA as a reshape of q to (B, T, K, G, E). Values past lengths[b] are zeroed,
    so whatever the unused slots hold never reaches the output.
    """
    T = 1 if q.ndim == 3 else q.shape[1]
    B, H, E = q.shape[0], q.shape[-2], q.shape[-1]
    _, page_size, K, _ = k_pages.shape
    S = block_tables.shape[1] * page_size
    sm_scale = sm_scale_or_default(sm_scale, E)
    k = k_pages[block_tables].reshape(B, S, K, E)  # (B, max_pages, page_size, K, E) -> (B, S, K, E)
    v = v_pages[block_tables].reshape(B, S, K, E)
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (B,))
    v = jnp.where((jnp.arange(S)[None, :] < lengths[:, None])[:, :, None, None], v, 0)
    # Query t of sequence b sees the keys before position lengths[b] - T + t + 1.
    seen = lengths[:, None] - T + 1 + jnp.arange(T)[None, :]  # (B, T)
    valid = jnp.arange(S)[None, None, :] < seen[:, :, None]  # (B, T, S)
    q5 = q.reshape(B, T, K, H // K, E)
    s = jnp.einsum("BTKGE,BSKE->BTKGS", q5, k, preferred_element_type=jnp.float32) * sm_scale
    s = jnp.where(valid[:, :, None, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # rows with no key: keep exp(-inf - 0) = 0
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)  # (B, T, K, G)
    o = jnp.einsum("BTKGS,BSKE->BTKGE", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    o = o / jnp.where(l == 0.0, 1.0, l)[..., None]
    return o.reshape(q.shape).astype(q.dtype)
