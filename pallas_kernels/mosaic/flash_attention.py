"""Flash attention for Hopper (sm_90a) as Mosaic GPU kernels: TMA loads, wgmma, warp specialization.

The same contract as `pallas_kernels.flash_attention` (the Triton kernels): GQA without repeating
K/V, a causal mask aligned to the end of the keys with a per-sequence offset (chunked prefill after
a cache), ragged kv lengths, packed-document segment ids, any sequence length (padded to whole
blocks here, masked, sliced off), forward and backward (dq, dk, dv).

Structure, as FlashAttention-3 (Shah et al. 2024) lays out a CTA: warpgroups 0 and 1 compute, each
on its own 64 rows (one wgmma M), and warpgroup 2 only issues TMA copies into a ring of `depth` shared
memory slots. The producer waits on a slot's "consumed" barrier before refilling it; the consumers
wait on its "loaded" barrier (which counts the TMA bytes) and arrive on "consumed" when done. What
FA3 also does and this does not (yet): the ping-pong schedule barrier between the two compute
warpgroups, and overlapping one block's softmax with the next block's QK^T wgmma.

Every kernel also runs in the Mosaic GPU interpreter on CPU (shared memory, TMA, wgmma and barriers
simulated, races detectable), and that shapes the code (probed on jax 0.10.2):
- wgmma's B operand is never transposed in place (the interpreter rejects `transpose_ref`): XLA passes
  K^T, V^T, Q^T and dO^T laid out (E, length), an O(length) copy against O(length^2) work.
- wgmma's A operand comes from shared memory (the interpreter rejects registers): P and dS are
  written to shared memory before their wgmma.
- every wgmma gets a fresh accumulator, read back at once; running sums are rescaled and added in
  registers (the interpreter has no `run_state`, so no accumulate-in-place).
- grid and warpgroup indices come from `lax.axis_index` of named axes (`pl.program_id` is 0 in the
  interpreter).
- register layouts (`plgpu.Layout.WGMMA...`) are named only in the compiled kernel: the interpreter
  has no layouts and rejects the casts, the compiler needs them (see `Regs`).

Softmax in base 2 with the logit scale folded into one multiply; f32 statistics and accumulators; P
and dS rounded to the input dtype for their wgmma, as FA2/FA3 do. The forward saves the log-sum-exp
(base 2); the backward recomputes P from it (FA2's backward: delta = rowsum(dO * O) in XLA, then a
dq kernel over key blocks and a dk/dv kernel over query blocks and the G query heads of a kv head).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import (LOG2E, MASK_VALUE, by_platform, normalize_masks, pad_axis,
                                    round_up, sm_scale_or_default)
from pallas_kernels.mosaic._common import launch, mma, mma_add, produce, smem, spread

_WGS = 2  # compute warpgroups per CTA; warpgroup index _WGS issues the TMA copies
_LN2_INV = 1.0 / 0.6931471805599453  # log2(x) = log(x) / ln 2


# --- Pieces the three kernels share ------------------------------------------------------------------


def _visible(regs, shape, q_dim, q_pos, k_pos, kv_len, causal, q_seg, kv_seg):
    """Bool tile: key k sees query q. Axis q_dim of the tile indexes queries from position q_pos,
    the other axis keys from index k_pos; q_seg/kv_seg are vectors along those axes (or None)."""
    k_dim = 1 - q_dim
    k_idx = k_pos + regs.iota(shape, k_dim)
    mask = k_idx < kv_len
    if causal:
        mask = mask & (k_idx <= q_pos + regs.iota(shape, q_dim))
    if q_seg is not None:
        mask = mask & (spread(q_seg, shape, q_dim) == spread(kv_seg, shape, k_dim))
    return mask


def _cdiv(a, b: int):
    return lax.div(a + b - 1, b)  # a >= 0


def _key_blocks(q_row, rows, q_off, kv_len, block_k, causal, segmented):
    """Key blocks of queries [q_row, q_row + rows): [0, n_full) need no mask, [n_full, n) do."""
    hi = kv_len
    if causal:  # the last query sits at key position q_off + q_row + rows - 1
        hi = jnp.minimum(hi, q_off + q_row + rows)
    n = _cdiv(jnp.maximum(hi, 0), block_k)
    if segmented:
        return jnp.int32(0), n
    full = kv_len
    if causal:  # keys that the first query (and so every query) may see
        full = jnp.minimum(full, q_off + q_row + 1)
    return jnp.clip(lax.div(jnp.maximum(full, 0), block_k), 0, n), n


def _query_blocks(k_row, rows, q_off, kv_len, block_q, num_q_blocks, causal, segmented):
    """Query blocks that see keys [k_row, k_row + rows): [first, n_q); [first, first_full) need a
    mask, [first_full, n_q) do not."""
    first = first_full = jnp.int32(0)
    if causal:  # query i sees key k iff k <= q_off + i
        first = jnp.clip(lax.div(jnp.maximum(k_row - q_off, 0), block_q), 0, num_q_blocks)
        first_full = _cdiv(jnp.maximum(k_row + rows - 1 - q_off, 0), block_q)
    first = jnp.where(k_row >= kv_len, num_q_blocks, first)  # keys past kv_len: no work
    ragged = segmented | (k_row + rows > kv_len)
    first_full = jnp.where(ragged, num_q_blocks, jnp.clip(first_full, first, num_q_blocks))
    return first, first_full


def _store(tile_smem, vec_smem, dst_tile, dst_vec):
    """Registers already written to shared memory -> HBM by TMA, and wait for it."""
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(tile_smem, dst_tile)
    if vec_smem is not None:
        plgpu.copy_smem_to_gmem(vec_smem, dst_vec)
    plgpu.wait_smem_to_gmem(0)


# --- Forward -----------------------------------------------------------------------------------------


def _fwd_kernel(q_off_ref, kv_len_ref, q_ref, kt_ref, v_ref, *refs, sm_scale, causal, segmented,
                block_q, block_k, depth, num_q_blocks, group, wgs, regs, **scratch):
    if segmented:
        q_seg_ref, kv_seg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    s = scratch
    wg, b, h = lax.axis_index("wg"), lax.axis_index("b"), lax.axis_index("h")
    # Causal: the longest query blocks first, so the short ones fill the last wave.
    i = num_q_blocks - 1 - lax.axis_index("q") if causal else lax.axis_index("q")
    q_off, kv_len = q_off_ref[b], kv_len_ref[b]
    kv_h = lax.div(h, group)  # GQA: query head h reads kv head h // G
    cta_row = i * (wgs * block_q)
    # Both compute warpgroups walk the same key blocks (they share each TMA'd K/V block): the mask
    # covers what the lower rows may not see.
    n_full, n = _key_blocks(cta_row, wgs * block_q, q_off, kv_len, block_k, causal, segmented)

    @pl.when(wg == wgs)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def copies(j, slot, barrier):
            ks = pl.ds(j * block_k, block_k)
            plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_h, :, ks], s["kt"].at[slot], barrier)
            plgpu.copy_gmem_to_smem(v_ref.at[b, ks, kv_h], s["v"].at[slot], barrier)
            if segmented:
                plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, ks], s["kv_seg"].at[slot], barrier)
        produce([(0, n, copies)], s["loaded"], s["consumed"], depth)

    @pl.when(wg < wgs)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        row = cta_row + wg * block_q
        q_smem, p_smem = s["q"].at[wg], s["p"].at[wg]
        rows = pl.ds(row, block_q)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, s["q_bar"].at[wg])
        if segmented:
            plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], s["q_seg"].at[wg], s["q_bar"].at[wg])
        plgpu.barrier_wait(s["q_bar"].at[wg])
        q_seg = regs.load(s["q_seg"].at[wg], 0) if segmented else None
        E = q_smem.shape[-1]
        scale = sm_scale * LOG2E

        def step(j, carry, masked):
            acc, m, l = carry
            slot = lax.rem(j, depth)
            plgpu.barrier_wait(s["loaded"].at[slot])
            x = mma(q_smem, s["kt"].at[slot], (block_q, block_k)) * scale  # (block_q, block_k)
            if masked:
                kv_seg = regs.load(s["kv_seg"].at[slot], 1) if segmented else None
                mask = _visible(regs, x.shape, 0, q_off + row, j * block_k, kv_len, causal, q_seg, kv_seg)
                x = jnp.where(mask, x, MASK_VALUE)
            m_new = jnp.maximum(m, x.max(axis=1))
            p = jnp.exp2(x - spread(m_new, x.shape, 0))
            if masked:  # a row with no visible key so far must add nothing
                p = jnp.where(mask, p, 0.0)
            alpha = jnp.exp2(m - m_new)
            l = l * alpha + p.sum(axis=1)
            p_smem[...] = p.astype(p_smem.dtype)
            plgpu.commit_smem()
            pv = mma(p_smem, s["v"].at[slot], (block_q, E))  # (block_q, E)
            plgpu.barrier_arrive(s["consumed"].at[slot])
            return acc * spread(alpha, acc.shape, 0) + pv, m_new, l

        carry = (regs.zeros((block_q, E)), regs.full_rows(block_q, MASK_VALUE), regs.zeros((block_q,)))
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        acc, m, l = lax.fori_loop(n_full, n, functools.partial(step, masked=True), carry)
        empty = l == 0.0  # a query that sees no key: output 0, and an lse that zeroes its p
        l = jnp.where(empty, 1.0, l)
        q_smem[...] = (acc / spread(l, acc.shape, 0)).astype(q_smem.dtype)
        s["lse"].at[wg][...] = jnp.where(empty, -MASK_VALUE, m + jnp.log(l) * _LN2_INV)
        _store(q_smem, s["lse"].at[wg], o_ref.at[b, rows, h], lse_ref.at[b, h, rows])


# --- Backward: dq ------------------------------------------------------------------------------------


def _dq_kernel(q_off_ref, kv_len_ref, q_ref, do_ref, lse_ref, delta_ref, k_ref, kt_ref, vt_ref, *refs,
               sm_scale, causal, segmented, block_q, block_k, depth, num_q_blocks, group, wgs, regs,
               **scratch):
    if segmented:
        q_seg_ref, kv_seg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    s = scratch
    wg, b, h = lax.axis_index("wg"), lax.axis_index("b"), lax.axis_index("h")
    i = num_q_blocks - 1 - lax.axis_index("q") if causal else lax.axis_index("q")
    q_off, kv_len = q_off_ref[b], kv_len_ref[b]
    kv_h = lax.div(h, group)
    cta_row = i * (wgs * block_q)
    n_full, n = _key_blocks(cta_row, wgs * block_q, q_off, kv_len, block_k, causal, segmented)

    @pl.when(wg == wgs)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def copies(j, slot, barrier):
            ks = pl.ds(j * block_k, block_k)
            plgpu.copy_gmem_to_smem(kt_ref.at[b, kv_h, :, ks], s["kt"].at[slot], barrier)
            plgpu.copy_gmem_to_smem(vt_ref.at[b, kv_h, :, ks], s["vt"].at[slot], barrier)
            plgpu.copy_gmem_to_smem(k_ref.at[b, ks, kv_h], s["k"].at[slot], barrier)
            if segmented:
                plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, ks], s["kv_seg"].at[slot], barrier)
        produce([(0, n, copies)], s["loaded"], s["consumed"], depth)

    @pl.when(wg < wgs)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        row = cta_row + wg * block_q
        rows = pl.ds(row, block_q)
        q_smem, do_smem, ds_smem = s["q"].at[wg], s["do"].at[wg], s["ds"].at[wg]
        bar = s["q_bar"].at[wg]
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, bar)
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, bar)
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], s["lse"].at[wg], bar)
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], s["delta"].at[wg], bar)
        if segmented:
            plgpu.copy_gmem_to_smem(q_seg_ref.at[b, rows], s["q_seg"].at[wg], bar)
        plgpu.barrier_wait(bar)
        lse, delta = regs.load(s["lse"].at[wg], 0), regs.load(s["delta"].at[wg], 0)
        q_seg = regs.load(s["q_seg"].at[wg], 0) if segmented else None
        E = q_smem.shape[-1]
        scale = sm_scale * LOG2E

        def step(j, dq, masked):
            slot = lax.rem(j, depth)
            plgpu.barrier_wait(s["loaded"].at[slot])
            x = mma(q_smem, s["kt"].at[slot], (block_q, block_k)) * scale  # (block_q, block_k)
            p = jnp.exp2(x - spread(lse, x.shape, 0))
            if masked:
                kv_seg = regs.load(s["kv_seg"].at[slot], 1) if segmented else None
                p = jnp.where(_visible(regs, x.shape, 0, q_off + row, j * block_k, kv_len, causal,
                                       q_seg, kv_seg), p, 0.0)
            dp = mma(do_smem, s["vt"].at[slot], (block_q, block_k))
            ds_smem[...] = (p * (dp - spread(delta, dp.shape, 0))).astype(ds_smem.dtype)
            plgpu.commit_smem()
            part = mma(ds_smem, s["k"].at[slot], (block_q, E))  # (block_q, E)
            plgpu.barrier_arrive(s["consumed"].at[slot])
            return dq + part

        dq = lax.fori_loop(0, n_full, functools.partial(step, masked=False), regs.zeros((block_q, E)))
        dq = lax.fori_loop(n_full, n, functools.partial(step, masked=True), dq)
        q_smem[...] = (dq * sm_scale).astype(q_smem.dtype)
        _store(q_smem, None, dq_ref.at[b, rows, h], None)


# --- Backward: dk, dv --------------------------------------------------------------------------------


def _dkv_streams(outputs, segmented):
    """What the dk/dv kernel streams per query block: Q^T and the lse for P^T; dO for dv; dO^T, Q
    and delta for dk."""
    names = ["qt", "lse"] + (["do"] if "dv" in outputs else []) + (
        ["dot", "q", "delta"] if "dk" in outputs else [])
    return names + (["q_seg"] if segmented else [])


def _dkv_kernel(q_off_ref, kv_len_ref, k_ref, v_ref, q_ref, qt_ref, do_ref, dot_ref, lse_ref, delta_ref,
                *refs, sm_scale, causal, segmented, block_q, block_k, depth, num_q_blocks, group, wgs,
                outputs, regs, **scratch):
    # One CTA per (block of wgs x block_k keys, batch, kv head); it walks the G query heads of the
    # group and the query blocks that see its keys, and sums their dk and/or dv (`outputs`) in
    # registers.
    if segmented:
        q_seg_ref, kv_seg_ref, *out_refs = refs
    else:
        out_refs = refs
    out_refs = dict(zip(outputs, out_refs))
    s = scratch
    wg, b, kv_h = lax.axis_index("wg"), lax.axis_index("b"), lax.axis_index("h")
    q_off, kv_len = q_off_ref[b], kv_len_ref[b]
    cta_key = lax.axis_index("k") * (wgs * block_k)
    first, first_full = _query_blocks(cta_key, wgs * block_k, q_off, kv_len, block_q, num_q_blocks,
                                      causal, segmented)

    def head_steps(fn):
        """(lo, hi, fn) ranges: for each query head of the group, query blocks [first, n_q)."""
        return [(first, num_q_blocks, functools.partial(fn, kv_h * group + g)) for g in range(group)]

    @pl.when(wg == wgs)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def copies(h, i, slot, barrier):
            qs = pl.ds(i * block_q, block_q)
            src = dict(qt=qt_ref.at[b, h, :, qs], dot=dot_ref.at[b, h, :, qs], q=q_ref.at[b, qs, h],
                       do=do_ref.at[b, qs, h], lse=lse_ref.at[b, h, qs], delta=delta_ref.at[b, h, qs])
            if segmented:
                src["q_seg"] = q_seg_ref.at[b, qs]
            for name in _dkv_streams(outputs, segmented):
                plgpu.copy_gmem_to_smem(src[name], s[name].at[slot], barrier)
        produce(head_steps(copies), s["loaded"], s["consumed"], depth)

    @pl.when(wg < wgs)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        key = cta_key + wg * block_k
        keys = pl.ds(key, block_k)
        k_smem, v_smem = s["k"].at[wg], s["v"].at[wg]
        p_smem = s["p"].at[wg] if "dv" in outputs else None
        ds_smem = s["ds"].at[wg] if "dk" in outputs else None
        bar = s["kv_bar"].at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_h], k_smem, bar)
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_h], v_smem, bar)
        if segmented:
            plgpu.copy_gmem_to_smem(kv_seg_ref.at[b, keys], s["kv_seg"].at[wg], bar)
        plgpu.barrier_wait(bar)
        kv_seg = regs.load(s["kv_seg"].at[wg], 0) if segmented else None
        E = k_smem.shape[-1]
        scale = sm_scale * LOG2E
        shape = (block_k, block_q)  # transposed scores: keys are rows

        def step(i, carry, masked):
            dk, dv, t = carry
            slot = lax.rem(t, depth)
            plgpu.barrier_wait(s["loaded"].at[slot])
            x = mma(k_smem, s["qt"].at[slot], shape) * scale  # S^T (block_k, block_q)
            p = jnp.exp2(x - spread(regs.load(s["lse"].at[slot], 1), shape, 1))
            if masked:
                q_seg = regs.load(s["q_seg"].at[slot], 1) if segmented else None
                p = jnp.where(_visible(regs, shape, 1, q_off + i * block_q, key, kv_len, causal,
                                       q_seg, kv_seg), p, 0.0)
            if "dv" in outputs:
                p_smem[...] = p.astype(p_smem.dtype)
            if "dk" in outputs:
                dp = mma(v_smem, s["dot"].at[slot], shape)  # dP^T = V dO^T
                ds = p * (dp - spread(regs.load(s["delta"].at[slot], 1), shape, 1))
                ds_smem[...] = ds.astype(ds_smem.dtype)
            plgpu.commit_smem()
            if "dv" in outputs:
                dv = mma_add(regs, dv, p_smem, s["do"].at[slot])  # + P^T dO
            if "dk" in outputs:
                dk = mma_add(regs, dk, ds_smem, s["q"].at[slot])  # + dS^T Q
            plgpu.barrier_arrive(s["consumed"].at[slot])
            return dk, dv, t + 1

        zeros = regs.zeros((block_k, E))
        carry = (zeros if "dk" in outputs else None, zeros if "dv" in outputs else None, jnp.int32(0))
        for _ in range(group):  # the step counter t keeps the ring slots in step with the producer
            carry = lax.fori_loop(first, first_full, functools.partial(step, masked=True), carry)
            carry = lax.fori_loop(first_full, num_q_blocks, functools.partial(step, masked=False), carry)
        dk, dv, _ = carry
        tiles = dict(dk=(k_smem, dk * sm_scale if dk is not None else None), dv=(v_smem, dv))
        for name in outputs:
            tile, value = tiles[name]
            tile[...] = value.astype(tile.dtype)  # K, V were read for the last time above
        plgpu.commit_smem()
        for name in outputs:
            plgpu.copy_smem_to_gmem(tiles[name][0], out_refs[name].at[b, keys, kv_h])
        plgpu.wait_smem_to_gmem(0)


# --- Public wrapper ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the three kernels: rows per compute warpgroup (a CTA has two) and the streamed block
    (multiples of 64: one wgmma M, one 128-byte swizzle of 16-bit values), and the ring depth."""

    block_q: int = 64  # forward: query rows per warpgroup
    block_k: int = 128  # forward: keys per streamed K^T/V block
    depth: int = 2  # forward: TMA ring slots
    block_q_dq: int = 64
    block_k_dq: int = 64
    block_q_dkv: int = 64  # dk/dv: queries per streamed Q/dO block
    block_k_dkv: int = 64  # dk/dv: key rows per warpgroup
    depth_bwd: int = 2
    wgs_dkv: int = 2  # dk/dv: compute warpgroups per CTA
    split_dkv: bool = False  # dk and dv in two kernels, one accumulator each (P^T computed twice)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "split_dkv":
                continue
            if f.name.startswith(("depth", "wgs")):
                if v < 1:
                    raise ValueError(f"{f.name}={v} must be at least 1")
            elif v < 64 or v & (v - 1):
                raise ValueError(f"{f.name}={v} must be a power of two >= 64")

    @classmethod
    def get_default(cls, head_dim: int, *, causal: bool = True, seq_len: int = 4096) -> "BlockSizes":
        """The tiles for a head dim (64 or 128 after padding), from `_TABLE`."""
        del causal, seq_len  # not yet tuned on a GPU: one entry per head dim
        return _TABLE[head_dim > 64]


# head dim -> tiles, within an H100's 227 KB of shared memory per CTA and 232 registers per compute
# thread (`make gpu-check` reports both). Forward: 2 x 64 query rows (FA3's CTA), 128-key blocks;
# at head dim 64 a third ring slot fits (2 x 3 x 16 KB of K^T/V), at 128 two (2 x 2 x 32 KB). The
# backward streams 3 (dq) or 4 (dk/dv) tiles per step, so its blocks are 64. Not yet timed on a GPU.
_TABLE = {
    False: BlockSizes(block_q=64, block_k=128, depth=3),
    True: BlockSizes(block_q=64, block_k=64, depth=2, split_dkv=True),
}


def _fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, bs, interpret):
    B, T, H, E = q.shape
    K = k.shape[2]
    bq, bk, depth, dt = bs.block_q, bs.block_k, bs.depth, q.dtype
    segmented = q_seg is not None
    kt = k.transpose(0, 2, 3, 1)  # (B, K, E, S): Q K^T's B operand as wgmma reads it
    scratch = dict(
        q=smem((_WGS, bq, E), dt, True), p=smem((_WGS, bq, bk), dt, True),
        kt=smem((depth, E, bk), dt, True), v=smem((depth, bk, E), dt, True),
        lse=smem((_WGS, bq), jnp.float32),
        q_bar=plgpu.Barrier(num_arrivals=1 + segmented, num_barriers=_WGS),
        loaded=plgpu.Barrier(num_arrivals=2 + segmented, num_barriers=depth),
        consumed=plgpu.Barrier(num_arrivals=_WGS, num_barriers=depth))
    args = [q_off, kv_len, q, kt, v]
    if segmented:
        scratch.update(q_seg=smem((_WGS, bq), jnp.int32), kv_seg=smem((depth, bk), jnp.int32))
        args += [q_seg, kv_seg]
    nq = T // (_WGS * bq)
    return launch(_fwd_kernel, "mosaic_flash_attention_fwd", (nq, B, H), ("q", "b", "h"),
                  [jax.ShapeDtypeStruct(q.shape, dt), jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
                  scratch, interpret, wgs=_WGS, sm_scale=sm_scale, causal=causal, segmented=segmented,
                  block_q=bq, block_k=bk, depth=depth, num_q_blocks=nq, group=H // K)(*args)


def _bwd(q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse, do, causal, sm_scale, bs, interpret):
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    depth, dt, f32 = bs.depth_bwd, q.dtype, jnp.float32
    segmented = q_seg is not None
    seg = [q_seg, kv_seg] if segmented else []
    kw = dict(sm_scale=sm_scale, causal=causal, segmented=segmented, depth=depth, group=H // K)
    # delta_i = sum_e o_ie * do_ie, the softmax-Jacobian term; one fused XLA reduction.
    delta = jnp.einsum("BTHE,BTHE->BHT", o.astype(f32), do.astype(f32))
    # wgmma's B operands, transposed by XLA: (B, K, E, S) and (B, H, E, T).
    kt, vt = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 3, 1)
    qt, dot = q.transpose(0, 2, 3, 1), do.transpose(0, 2, 3, 1)

    bq, bk = bs.block_q_dq, bs.block_k_dq
    scratch = dict(
        q=smem((_WGS, bq, E), dt, True), do=smem((_WGS, bq, E), dt, True),
        ds=smem((_WGS, bq, bk), dt, True), lse=smem((_WGS, bq), f32), delta=smem((_WGS, bq), f32),
        kt=smem((depth, E, bk), dt, True), vt=smem((depth, E, bk), dt, True),
        k=smem((depth, bk, E), dt, True),
        q_bar=plgpu.Barrier(num_arrivals=4 + segmented, num_barriers=_WGS),
        loaded=plgpu.Barrier(num_arrivals=3 + segmented, num_barriers=depth),
        consumed=plgpu.Barrier(num_arrivals=_WGS, num_barriers=depth))
    if segmented:
        scratch.update(q_seg=smem((_WGS, bq), jnp.int32), kv_seg=smem((depth, bk), jnp.int32))
    nq = T // (_WGS * bq)
    dq = launch(_dq_kernel, "mosaic_flash_attention_dq", (nq, B, H), ("q", "b", "h"),
                jax.ShapeDtypeStruct(q.shape, dt), scratch, interpret, wgs=_WGS, block_q=bq, block_k=bk,
                num_q_blocks=nq, **kw)(q_off, kv_len, q, do, lse, delta, k, kt, vt, *seg)

    bq, bk, wgs = bs.block_q_dkv, bs.block_k_dkv, bs.wgs_dkv

    def dkv(outputs):
        streams = _dkv_streams(outputs, segmented)
        ring = dict(qt=smem((depth, E, bq), dt, True), dot=smem((depth, E, bq), dt, True),
                    q=smem((depth, bq, E), dt, True), do=smem((depth, bq, E), dt, True),
                    lse=smem((depth, bq), f32), delta=smem((depth, bq), f32),
                    q_seg=smem((depth, bq), jnp.int32))
        scratch = dict(
            {n: ring[n] for n in streams},
            k=smem((wgs, bk, E), dt, True), v=smem((wgs, bk, E), dt, True),
            kv_bar=plgpu.Barrier(num_arrivals=2 + segmented, num_barriers=wgs),
            loaded=plgpu.Barrier(num_arrivals=len(streams), num_barriers=depth),
            consumed=plgpu.Barrier(num_arrivals=wgs, num_barriers=depth))
        if "dv" in outputs:
            scratch["p"] = smem((wgs, bk, bq), dt, True)
        if "dk" in outputs:
            scratch["ds"] = smem((wgs, bk, bq), dt, True)
        if segmented:
            scratch["kv_seg"] = smem((wgs, bk), jnp.int32)
        name = "mosaic_flash_attention_" + "".join(outputs)  # dkdv, dk or dv
        return launch(_dkv_kernel, name, (S // (wgs * bk), B, K), ("k", "b", "h"),
                      [jax.ShapeDtypeStruct(k.shape, dt) for _ in outputs], scratch, interpret,
                      wgs=wgs, outputs=outputs, block_q=bq, block_k=bk, num_q_blocks=T // bq, **kw)(
            q_off, kv_len, k, v, q, qt, do, dot, lse, delta, *seg)
    if bs.split_dkv:  # two f32 (block_k, E) accumulators spill at head dim 128
        (dk,), (dv,) = dkv(("dk",)), dkv(("dv",))
    else:
        dk, dv = dkv(("dk", "dv"))
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
def flash_attention_mosaic(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, q_segment_ids=None,
                           kv_segment_ids=None, sm_scale=None, block_sizes=None, interpret=None):
    """Multi-head attention with GQA, differentiable (Mosaic GPU forward and backward, Hopper).

    Args:
      q: [B, T, H, E] queries, bfloat16 or float16; E <= 128 (padded to 64 or 128 inside).
      k, v: [B, S, K, E] keys and values, H % K == 0 (G = H // K query heads per kv head).
      causal: query i sits at key position q_offset + i and sees keys j <= q_offset + i.
      q_offset: int or int32 [B]; default S - T (the queries are the last T keys).
      kv_lengths: optional int32 [B]; keys at index >= kv_lengths[b] are masked.
      q_segment_ids, kv_segment_ids: optional int32 [B, T] and [B, S]; a query sees only keys
        of its own segment. With T == S, q_segment_ids alone serves for both.
      sm_scale: logit scale, default 1 / sqrt(E).
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(E, causal=causal, seq_len=S)`.
      interpret: None: the Mosaic GPU interpreter when lowered for CPU, the compiled kernel when
        lowered for a GPU; True / False force one; or `interpreter(detect_races=True)`.

    Returns:
      [B, T, H, E] in q.dtype. A query that sees no key gets 0.
    """
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"{H=} query heads is not a multiple of {K=} kv heads")
    if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotImplementedError(f"bfloat16 or float16 q, k, v of one dtype, got {q.dtype}, "
                                  f"{k.dtype}, {v.dtype}")
    if E > 128:
        raise NotImplementedError(f"head dim {E} > 128")
    sm_scale = sm_scale_or_default(sm_scale, E)
    q_off, kv_len, q_seg, kv_seg = normalize_masks(
        B, T, S, q_offset, kv_lengths, q_segment_ids, kv_segment_ids)
    e_pad = 64 if E <= 64 else 128  # zero lanes change no dot product
    bs = block_sizes or BlockSizes.get_default(e_pad, causal=causal, seq_len=S)

    # Whole blocks: padded keys are masked through kv_len (<= S), padded queries sliced off.
    t_pad = round_up(T, max(_WGS * bs.block_q, _WGS * bs.block_q_dq, bs.block_q_dkv))
    s_pad = round_up(S, max(bs.block_k, bs.block_k_dq, bs.wgs_dkv * bs.block_k_dkv))
    q = pad_axis(pad_axis(q, 1, t_pad), 3, e_pad)  # (B, Tp, H, Ep)
    k = pad_axis(pad_axis(k, 1, s_pad), 3, e_pad)  # (B, Sp, K, Ep)
    v = pad_axis(pad_axis(v, 1, s_pad), 3, e_pad)
    if q_seg is not None:
        q_seg = pad_axis(q_seg, 1, t_pad)
        kv_seg = pad_axis(kv_seg, 1, s_pad)
    run = lambda interp, *a: _flash(*a, causal, sm_scale, bs, interp)  # noqa: E731
    if interpret is None:
        o = by_platform(run, None, q, k, v, q_off, kv_len, q_seg, kv_seg)
    else:  # a bool, or interpreter parameters (which by_platform would turn into True)
        o = run(interpret, q, k, v, q_off, kv_len, q_seg, kv_seg)
    return o[:, :T, :, :E]
