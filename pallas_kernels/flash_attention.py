"""Flash attention (FlashAttention-2, Dao 2023) for prefill and training, as Pallas Triton kernels.

What jax's own `pallas.ops.gpu.attention.mha` lacks and this adds: GQA without repeating K/V
(the K/V BlockSpec of query head h points at kv head h // G, and the dk/dv kernel sums the G
query heads of a group in registers), a causal mask aligned to the end of the keys with a
per-sequence offset (chunked prefill after a cache), ragged kv lengths, packed-document
segment ids, and any sequence length (padded to the block size here, masked, sliced off).

Online softmax in base 2 (exp(x) = exp2(x * log2 e)) with f32 accumulation. Key blocks that
every query of a block may see skip the mask; blocks no query may see are never loaded. The
forward saves the log-sum-exp (base 2) for the backward, which recomputes the probabilities.

Backend: Triton (see `_common`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._common import (LOG2E, MASK_VALUE, by_platform, dot, next_pow2, normalize_masks,
                                    pad_axis, round_up, sm_scale_or_default, softmax_finish,
                                    softmax_init, softmax_step, triton_params)


def _cdiv(a, b: int):
    return lax.div(a + b - 1, b)  # a >= 0; pl.cdiv does not take traced int32 here


def _mask(q_pos, k_pos, kv_len, causal, q_seg, kv_seg):
    """(block_q, block_k) bool: key index k_pos is visible to the query at position q_pos."""
    mask = (k_pos < kv_len)[None, :]
    if causal:
        mask = mask & (k_pos[None, :] <= q_pos[:, None])
    if q_seg is not None:
        mask = mask & (q_seg[:, None] == kv_seg[None, :])
    return mask


def _q_block_key_range(i, q_off, kv_len, block_q, block_k, causal, segmented):
    """Key blocks for query block i: [0, n_full) need no mask, [n_full, n_blocks) do."""
    hi = kv_len
    if causal:  # the block's last query sits at key position q_off + (i + 1) * block_q - 1
        hi = jnp.minimum(hi, q_off + (i + 1) * block_q)
    n_blocks = _cdiv(jnp.maximum(hi, 0), block_k)
    if segmented:
        return 0, n_blocks
    full = kv_len
    if causal:  # keys every query of the block may see
        full = jnp.minimum(full, q_off + i * block_q + 1)
    return jnp.clip(lax.div(jnp.maximum(full, 0), block_k), 0, n_blocks), n_blocks


def _fwd_kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs, sm_scale, causal, block_q,
                block_k, num_q_blocks, segmented):
    if segmented:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
        q_seg = q_seg_ref[...]
    else:
        o_ref, lse_ref = refs
        q_seg = kv_seg_ref = None
    # Causal: run the longest query blocks first, so the short ones fill the last wave.
    i = num_q_blocks - 1 - pl.program_id(0) if causal else pl.program_id(0)
    q_off, kv_len = q_off_ref[()], kv_len_ref[()]
    q = q_ref[...]  # (block_q, E)
    q_pos = q_off + i * block_q + jnp.arange(block_q)
    scale = sm_scale * LOG2E

    def body(j, carry, masked):
        ks = pl.ds(j * block_k, block_k)
        s = dot(q, k_ref[ks, :], trans_b=True) * scale  # (block_q, block_k) f32
        mask = None
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[ks]
            mask = _mask(q_pos, j * block_k + jnp.arange(block_k), kv_len, causal, q_seg, kv_seg)
        return softmax_step(carry, s, lambda: v_ref[ks, :], mask)

    n_full, n_blocks = _q_block_key_range(i, q_off, kv_len, block_q, block_k, causal, segmented)
    carry = softmax_init(block_q, q.shape[1])
    carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(n_full, n_blocks, functools.partial(body, masked=True), carry)
    o, lse, empty = softmax_finish(carry)
    o_ref[...] = o.astype(o_ref.dtype)
    # A query that sees no key: output 0, and an lse that zeroes its p in the backward.
    lse_ref[...] = jnp.where(empty, -MASK_VALUE, lse)


def _dq_kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
               sm_scale, causal, block_q, block_k, num_q_blocks, segmented):
    if segmented:
        q_seg_ref, kv_seg_ref, dq_ref = refs
        q_seg = q_seg_ref[...]
    else:
        (dq_ref,) = refs
        q_seg = kv_seg_ref = None
    i = num_q_blocks - 1 - pl.program_id(0) if causal else pl.program_id(0)
    q_off, kv_len = q_off_ref[()], kv_len_ref[()]
    q, do = q_ref[...], do_ref[...]  # (block_q, E)
    lse, delta = lse_ref[...], delta_ref[...]  # (block_q,)
    q_pos = q_off + i * block_q + jnp.arange(block_q)
    scale = sm_scale * LOG2E

    def body(j, dq, masked):
        ks = pl.ds(j * block_k, block_k)
        k, v = k_ref[ks, :], v_ref[ks, :]
        p = jnp.exp2(dot(q, k, trans_b=True) * scale - lse[:, None])  # (block_q, block_k)
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[ks]
            p = jnp.where(
                _mask(q_pos, j * block_k + jnp.arange(block_k), kv_len, causal, q_seg, kv_seg),
                p, 0.0)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    n_full, n_blocks = _q_block_key_range(i, q_off, kv_len, block_q, block_k, causal, segmented)
    dq = jnp.zeros(q.shape, jnp.float32)
    dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_full, n_blocks, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs,
                sm_scale, causal, block_q, block_k, num_q_blocks, segmented):
    # One program per (key block, batch, kv head); it loops over the G query heads of the
    # group and over the query blocks that can see this key block.
    if segmented:
        q_seg_ref, kv_seg_ref, dk_ref, dv_ref = refs
        kv_seg = kv_seg_ref[...]
    else:
        dk_ref, dv_ref = refs
        q_seg_ref = kv_seg = None
    j = pl.program_id(0)
    q_off, kv_len = q_off_ref[()], kv_len_ref[()]
    k, v = k_ref[...], v_ref[...]  # (block_k, E)
    k_pos = j * block_k + jnp.arange(block_k)
    scale = sm_scale * LOG2E

    # Query i sees key k_pos iff k_pos <= q_off + i: the first query block that sees any key
    # here, and the first whose every query sees every key here.
    # Traced int32 from the start: with Python 0s here, Triton's lowering gave the loop bound an
    # i1 type for non-causal attention ("('i1', 'i32')" in `make gpu-check`).
    first = first_full = jnp.zeros((), jnp.int32)
    if causal:
        first = jnp.clip(lax.div(jnp.maximum(j * block_k - q_off, 0), block_q), 0, num_q_blocks)
        first_full = _cdiv(jnp.maximum((j + 1) * block_k - 1 - q_off, 0), block_q)
    first = jnp.where(j * block_k >= kv_len, num_q_blocks, first)  # block past kv_len: skip
    ragged = segmented | ((j + 1) * block_k > kv_len)
    first_full = jnp.where(ragged, num_q_blocks, jnp.clip(first_full, first, num_q_blocks))

    def body(qb, carry, g, masked):
        dk, dv = carry
        qs = pl.ds(qb * block_q, block_q)
        q, do = q_ref[qs, g, :], do_ref[qs, g, :]  # (block_q, E)
        lse, delta = lse_ref[g, qs], delta_ref[g, qs]
        p = jnp.exp2(dot(q, k, trans_b=True) * scale - lse[:, None])  # (block_q, block_k)
        if masked:
            q_pos = q_off + qb * block_q + jnp.arange(block_q)
            q_seg = None if q_seg_ref is None else q_seg_ref[qs]
            p = jnp.where(_mask(q_pos, k_pos, kv_len, causal, q_seg, kv_seg), p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
        ds = p * (dot(do, v, trans_b=True) - delta[:, None])
        return dk + dot(ds.astype(q.dtype), q, trans_a=True), dv

    def head(g, carry):
        carry = lax.fori_loop(first, first_full, functools.partial(body, g=g, masked=True), carry)
        return lax.fori_loop(first_full, num_q_blocks, functools.partial(body, g=g, masked=False),
                             carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(0, q_ref.shape[1], head, (zeros, zeros))
    dk_ref[...] = (dk * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (powers of two, >= 16) of the forward, dq and dk/dv kernels."""

    block_q: int = 128
    block_k: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    num_warps: int = 4
    num_warps_bwd: int = 4
    num_stages: int = 2
    num_stages_bwd: int = 2

    @classmethod
    def get_default(cls, head_dim: int, *, causal: bool = True, seq_len: int = 4096) -> "BlockSizes":
        """The tiles for (head dim, causal, key length), from `_TABLE`."""
        wide = head_dim > 64
        short = causal and seq_len <= 2048
        return _TABLE[(wide, short)]

    def clamp(self, q_len: int, kv_len: int) -> "BlockSizes":
        """Shrinks tiles to short sequences (no 128-row tile for a 17-token prompt)."""
        tq, tk = max(16, next_pow2(q_len)), max(16, next_pow2(kv_len))
        return dataclasses.replace(
            self, block_q=min(self.block_q, tq), block_k=min(self.block_k, tk),
            block_q_dq=min(self.block_q_dq, tq), block_k_dq=min(self.block_k_dq, tk),
            block_q_dkv=min(self.block_q_dkv, tq), block_k_dkv=min(self.block_k_dkv, tk))


# (head dim > 64, causal with at most 2048 keys) -> tiles. Within the limits `make gpu-check`
# reports for an H100 (docs/GPU_COMPILE.md: registers, spills, shared memory), guided by published
# H100-tuned Triton flash-attention settings (openxla/tokamax autotuning tables: head dim 128, causal,
# T <= 2048: 64x64, 3 stages, 4 warps; T >= 4096 and non-causal: 128x128, 3 stages, 8 warps; head
# dim 64: 128x64, 3 stages, 4 warps; backward: 64x64, 2 stages). The dk/dv kernel at head dim 128
# holds two (64, 128) f32 accumulators: with 4 warps it hit the 255-register cap and spilled; with
# 8 warps and 2 stages it compiles to about 232 registers, no spill. Not yet timed on a GPU.
_BWD_64 = dict(block_q_dq=64, block_k_dq=64, block_q_dkv=64, block_k_dkv=64, num_warps_bwd=4, num_stages_bwd=2)
_BWD_128 = dict(_BWD_64, num_warps_bwd=8)
_TABLE = {
    (False, True): BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3, **_BWD_64),
    (False, False): BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=3, **_BWD_64),
    (True, True): BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3, **_BWD_128),
    (True, False): BlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=3, **_BWD_128),
}


def _per_batch_specs(order):
    """BlockSpecs of the per-sequence scalars q_off and kv_len; `order` maps grid -> batch."""
    return [pl.BlockSpec((None,), lambda *ids: (ids[order],))] * 2


def _fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, bs, interpret):
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    nq = T // bs.block_q
    segmented = q_seg is not None
    rev = (lambda i: nq - 1 - i) if causal else (lambda i: i)
    in_specs = _per_batch_specs(1) + [
        pl.BlockSpec((None, bs.block_q, None, E), lambda i, b, h: (b, rev(i), h, 0)),
        pl.BlockSpec((None, S, None, E), lambda i, b, h: (b, 0, h // G, 0)),  # GQA: no repeat
        pl.BlockSpec((None, S, None, E), lambda i, b, h: (b, 0, h // G, 0)),
    ]
    args = [q_off, kv_len, q, k, v]
    if segmented:
        in_specs += [pl.BlockSpec((None, bs.block_q), lambda i, b, h: (b, rev(i))),
                     pl.BlockSpec((None, S), lambda i, b, h: (b, 0))]
        args += [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, sm_scale=sm_scale, causal=causal, block_q=bs.block_q,
                          block_k=bs.block_k, num_q_blocks=nq, segmented=segmented),
        grid=(nq, B, H),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bs.block_q, None, E), lambda i, b, h: (b, rev(i), h, 0)),
                   pl.BlockSpec((None, None, bs.block_q), lambda i, b, h: (b, h, rev(i)))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        compiler_params=triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="flash_attention_fwd",
    )(*args)


def _bwd(q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse, do, causal, sm_scale, bs, interpret):
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    G = H // K
    segmented = q_seg is not None
    # delta_i = sum_e o_ie * do_ie, the softmax-Jacobian term; one fused XLA reduction.
    delta = jnp.einsum("BTHE,BTHE->BHT", o.astype(jnp.float32), do.astype(jnp.float32))
    params = triton_params(bs.num_warps_bwd, bs.num_stages_bwd)
    kw = dict(sm_scale=sm_scale, causal=causal, segmented=segmented)

    nq = T // bs.block_q_dq
    rev = (lambda i: nq - 1 - i) if causal else (lambda i: i)
    q_spec = pl.BlockSpec((None, bs.block_q_dq, None, E), lambda i, b, h: (b, rev(i), h, 0))
    kv_spec = pl.BlockSpec((None, S, None, E), lambda i, b, h: (b, 0, h // G, 0))
    row_spec = pl.BlockSpec((None, None, bs.block_q_dq), lambda i, b, h: (b, h, rev(i)))
    in_specs = _per_batch_specs(1) + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if segmented:
        in_specs += [pl.BlockSpec((None, bs.block_q_dq), lambda i, b, h: (b, rev(i))),
                     pl.BlockSpec((None, S), lambda i, b, h: (b, 0))]
    args = [q_off, kv_len, q, k, v, do, lse, delta] + ([q_seg, kv_seg] if segmented else [])
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_q=bs.block_q_dq, block_k=bs.block_k_dq,
                          num_q_blocks=nq, **kw),
        grid=(nq, B, H),
        in_specs=in_specs,
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dq",
    )(*args)

    # dk/dv: grid over (key block, batch, kv head); each program reads the G query heads
    # [h * G, (h + 1) * G) of its group, whole query length, and loops over them.
    nk = S // bs.block_k_dkv
    q_spec = pl.BlockSpec((None, T, G, E), lambda j, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, bs.block_k_dkv, None, E), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, G, T), lambda j, b, h: (b, h, 0))
    in_specs = _per_batch_specs(1) + [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if segmented:
        in_specs += [pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
                     pl.BlockSpec((None, bs.block_k_dkv), lambda j, b, h: (b, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=bs.block_q_dkv, block_k=bs.block_k_dkv,
                          num_q_blocks=T // bs.block_q_dkv, **kw),
        grid=(nk, B, K),
        in_specs=in_specs,
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="flash_attention_dkv",
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _flash(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, bs, interpret):
    return _fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, bs, interpret)[0]


def _flash_fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, bs, interpret):
    o, lse = _fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, bs, interpret)
    return o, (q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse)


def _flash_bwd(causal, sm_scale, bs, interpret, res, do):
    q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse = res
    dq, dk, dv = _bwd(q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse, do, causal, sm_scale, bs,
                      interpret)
    return dq, dk, dv, None, None, None, None  # the int inputs have no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale", "block_sizes", "interpret"))
def flash_attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, q_segment_ids=None,
                    kv_segment_ids=None, sm_scale=None, block_sizes=None, interpret=None):
    """Multi-head attention with GQA, differentiable (Pallas forward and backward).

    Args:
      q: [B, T, H, E] queries.
      k, v: [B, S, K, E] keys and values, H % K == 0 (G = H // K query heads per kv head).
      causal: query i sits at key position q_offset + i and sees keys j <= q_offset + i.
      q_offset: int or int32 [B]; default S - T (the queries are the last T keys).
      kv_lengths: optional int32 [B]; keys at index >= kv_lengths[b] are masked.
      q_segment_ids, kv_segment_ids: optional int32 [B, T] and [B, S]; a query sees only keys
        of its own segment. With T == S, q_segment_ids alone serves for both.
      sm_scale: logit scale, default 1 / sqrt(E).
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(E, causal=causal, seq_len=S)`.
      interpret: run the Pallas interpreter; None: the interpreter when lowered for CPU, the
        compiled kernel when lowered for a GPU.

    Returns:
      [B, T, H, E] in q.dtype. A query that sees no key gets 0.
    """
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"{H=} query heads is not a multiple of {K=} kv heads")
    sm_scale = sm_scale_or_default(sm_scale, E)
    q_off, kv_len, q_seg, kv_seg = normalize_masks(
        B, T, S, q_offset, kv_lengths, q_segment_ids, kv_segment_ids)
    bs = (block_sizes or BlockSizes.get_default(E, causal=causal, seq_len=S)).clamp(T, S)

    # Pad T and S to whole blocks (masked via kv_len, sliced off below) and E to a power of
    # two (zero lanes change no dot product): Triton tiles are powers of two.
    t_pad = round_up(T, max(bs.block_q, bs.block_q_dq, bs.block_q_dkv))
    s_pad = round_up(S, max(bs.block_k, bs.block_k_dq, bs.block_k_dkv))
    e_pad = max(16, next_pow2(E))
    q = pad_axis(pad_axis(q, 1, t_pad), 3, e_pad)  # (B, Tp, H, Ep)
    k = pad_axis(pad_axis(k, 1, s_pad), 3, e_pad)  # (B, Sp, K, Ep)
    v = pad_axis(pad_axis(v, 1, s_pad), 3, e_pad)
    if q_seg is not None:
        q_seg = pad_axis(q_seg, 1, t_pad)
        kv_seg = pad_axis(kv_seg, 1, s_pad)
    run = lambda interp, *a: _flash(*a, causal, sm_scale, bs, interp)  # noqa: E731
    o = by_platform(run, interpret, q, k, v, q_off, kv_len, q_seg, kv_seg)
    return o[:, :T, :, :E]


@functools.partial(jax.jit, static_argnames=("causal", "sm_scale"))
def flash_attention_reference(q, k, v, *, causal=True, q_offset=None, kv_lengths=None,
                              q_segment_ids=None, kv_segment_ids=None, sm_scale=None):
    """Plain-jnp attention with the same contract as `flash_attention` (the XLA fallback).

    GQA is a reshape of q to (B, T, K, G, E), never a copy of K/V. Logits and softmax are f32;
    the probabilities are cast to v.dtype for the value matmul (as flash kernels do), which
    accumulates in f32. Memory is O(B * H * T * S).
    """
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    sm_scale = sm_scale_or_default(sm_scale, E)
    q_off, kv_len, q_seg, kv_seg = normalize_masks(
        B, T, S, q_offset, kv_lengths, q_segment_ids, kv_segment_ids)
    q5 = q.reshape(B, T, K, H // K, E)  # (B, T, K, G, E)
    s = jnp.einsum("BTKGE,BSKE->BKGTS", q5, k, preferred_element_type=jnp.float32) * sm_scale
    k_idx = jnp.arange(S)
    mask = (k_idx[None, None, :] < kv_len[:, None, None])  # (B, 1, S)
    if causal:
        q_pos = q_off[:, None] + jnp.arange(T)[None, :]  # (B, T)
        mask = mask & (k_idx[None, None, :] <= q_pos[:, :, None])  # (B, T, S)
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    s = jnp.where(mask[:, None, None], s, -jnp.inf)  # (B, K, G, T, S)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row with no key: exp(-inf - 0) = 0, not NaN
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1)  # (B, K, G, T)
    o = jnp.einsum("BKGTS,BSKE->BTKGE", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    l = jnp.where(l == 0.0, 1.0, l).transpose(0, 3, 1, 2)[..., None]  # (B, T, K, G, 1)
    return (o / l).reshape(B, T, H, E).astype(q.dtype)
