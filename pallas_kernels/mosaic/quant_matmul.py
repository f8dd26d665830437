"""x @ W^T with W quantized weight-only (int8, int4, fp8), as a Mosaic GPU kernel for Hopper: the
prefill product (issue 25). TMA loads, dequantization in registers, wgmma.

The same contract and numerics as `pallas_kernels.quant_matmul` (the Triton kernel; read its
docstring for the layouts): W [N out, K in] quantized along K, int8 with one scale per output
channel or per group of G, int4 two nibbles a byte as GGUF packs a group (byte j: value j in the low
nibble, value j + G/2 in the high one), with or without mins, fp8 e4m3 (dequantized as int8 is).
Per-channel int8 / fp8 values enter the product exactly and the scale multiplies the f32 result;
grouped formats are dequantized in f32 (q * scale + min) and cast once to x's dtype; accumulation in
f32. The reference is `quant_matmul_reference`. Decode (a few rows of x) stays with the Triton
kernel, whose tiles put the weight on the MMA's large side: here x's rows are padded to 128.

The product is computed transposed, y^T = W x^T ([N, K] @ [K, M]), as the Triton kernel does: the
dequantized weight tile is wgmma's A operand, which the kernel writes to shared memory itself, and
x^T (laid out by XLA, an O(MK) copy against O(MNK) work) is its B operand, read as TMA loads it.
JAX's `hopper_mixed_type_matmul_mgpu.py` instead feeds the dequantized operand to wgmma from
registers; the Mosaic GPU interpreter rejects a register A operand (see `flash_attention`), so this
kernel goes through shared memory and runs in both.

A CTA computes a [128, block_m] tile of y^T: warpgroups 0 and 1 each own 64 output channels (one
wgmma M), warpgroup 2 only issues TMA copies into a ring of `depth` slots (x^T [block_k, block_m],
each warpgroup's quantized bytes [64, block_k or block_k / 2], its scales and mins). Per step a
compute warpgroup loads its bytes into registers, dequantizes them, writes the bf16 tile
[64, block_k] to shared memory in wgmma's layout (8 x 64 tiles, 128-byte swizzle), and accumulates
tile @ x^T into f32 registers.

int4 needs no shuffle across lanes: a tile's low nibbles hold the first half of each of its groups
and the high nibbles the second half, so the tile is written as [low nibbles | high nibbles] (two
column halves, each a whole number of swizzle atoms), and XLA permutes the rows of x^T to match
(per K tile: for each half, for each group, G/2 values). Scales (and mins) are per (channel, group):
XLA passes them transposed [K/G, N], so a group's scales are a vector over the tile's rows that TMA
copies and a register load spreads over the row's columns; a tile's few groups are picked per column
by compares against a column iota (a group wider than a tile spans several tiles, one scale each).

Gradient: with respect to x only, as the Triton kernel's (XLA's product with the dequantized weight).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels._common import by_platform, pad_axis, round_up
from pallas_kernels.mosaic._common import launch, mma_add, produce, smem, spread
# The operand checks and the x-only backward are the Triton kernel's: one contract, one gradient.
from pallas_kernels.quant_matmul import check_operands, with_x_gradient

FORMATS = ("int8", "int4", "fp8")
_WGS = 2  # compute warpgroups per CTA; warpgroup _WGS issues the TMA copies
_ROWS = 64  # output channels per compute warpgroup: one wgmma M
BLOCK_N = _WGS * _ROWS  # output channels per CTA
MAX_GROUP = 512  # as the Triton kernel's: groups are powers of two from 16 to 512 values
_H100_SMEM = 227 * 1024
# f32 in shared memory as TMA stores it: (8, 32) tiles, 128-byte swizzle.
_F32_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


def _byte_transforms(width: int):
    """8-bit values [rows, width bytes] as a tiled, swizzled register load reads them."""
    swizzle = min(128, width)
    return (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))


# --- Kernel ------------------------------------------------------------------------------------------


def _kernel(xt_ref, v_ref, s_ref, *refs, fmt, group, per_channel, has_mins, block_m, block_k, depth,
            num_k, wgs, regs, **scratch):
    if has_mins:
        min_ref, o_ref = refs
    else:
        (o_ref,), min_ref = refs, None
    s = scratch
    wg, m0 = lax.axis_index("wg"), lax.axis_index("m") * block_m
    n0 = lax.axis_index("n") * (wgs * _ROWS)
    int4 = fmt == "int4"
    width = block_k // 2 if int4 else block_k  # bytes of a row of the quantized tile
    tile_groups = 1 if per_channel else max(1, block_k // group)  # groups a K tile touches
    tiles_per_group = max(1, group // block_k)  # K tiles a group spans (1 unless G > block_k)

    @pl.when(wg == wgs)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def copies(t, slot, barrier):
            plgpu.copy_gmem_to_smem(xt_ref.at[pl.ds(t * block_k, block_k), pl.ds(m0, block_m)],
                                    s["xt"].at[slot], barrier)
            for w in range(wgs):
                rows = pl.ds(n0 + w * _ROWS, _ROWS)
                plgpu.copy_gmem_to_smem(v_ref.at[rows, pl.ds(t * width, width)], s["v"].at[slot, w], barrier)
                if not per_channel:  # scales^T / mins^T [K/G, N]: the tile's groups, this warpgroup's rows
                    first = t * tile_groups if tiles_per_group == 1 else lax.div(t, tiles_per_group)
                    groups = pl.ds(first, tile_groups)
                    plgpu.copy_gmem_to_smem(s_ref.at[groups, rows], s["s"].at[slot, w], barrier)
                    if has_mins:
                        plgpu.copy_gmem_to_smem(min_ref.at[groups, rows], s["mins"].at[slot, w], barrier)
        produce([(0, num_k, copies)], s["loaded"], s["consumed"], depth)

    @pl.when(wg < wgs)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        rows = pl.ds(n0 + wg * _ROWS, _ROWS)
        a_smem = s["a"].at[wg]
        if per_channel:
            plgpu.copy_gmem_to_smem(s_ref.at[rows], s["pc"].at[wg], s["pc_bar"].at[wg])
            plgpu.barrier_wait(s["pc_bar"].at[wg])
        shape = (_ROWS, width)  # a dequantized part: the whole tile (int8), one nibble's half (int4)
        # Columns of a part per group: int8 G values; int4 G/2 bytes (each half holds G/2 of a group).
        per_group = group // 2 if int4 else group
        cols = regs.iota(shape, 1) if tile_groups > 1 else None

        def per_column(ref):
            """The tile's per-group vectors [groups, 64] as a [64, width] f32 array: column c gets
            its group's value."""
            out = None
            for g in reversed(range(tile_groups)):
                v = spread(regs.load(ref.at[g], 0).astype(jnp.float32), shape, 0)
                out = v if out is None else jnp.where(cols < (g + 1) * per_group, v, out)
            return out

        def step(t, acc):
            slot = lax.rem(t, depth)
            plgpu.barrier_wait(s["loaded"].at[slot])
            q = s["v"].at[slot, wg][...]  # (64, width) int8 / uint8 / fp8
            if int4:
                b = q.astype(jnp.int32)
                parts = [((b & 15).astype(jnp.float32), slice(0, width)),
                         ((b >> 4).astype(jnp.float32), slice(width, 2 * width))]
            else:
                parts = [(q.astype(jnp.float32), slice(0, width))]
            if not per_channel:
                scale = per_column(s["s"].at[slot, wg])
                w_min = per_column(s["mins"].at[slot, wg]) if has_mins else None
            for w, half in parts:
                if int4 and not has_mins:
                    w = w - 8.0
                if not per_channel:
                    w = w * scale if w_min is None else w * scale + w_min
                a_smem.at[:, half][...] = w.astype(a_smem.dtype)
            plgpu.commit_smem()
            acc = mma_add(regs, acc, a_smem, s["xt"].at[slot])  # (64, block_k) @ (block_k, block_m)
            plgpu.barrier_arrive(s["consumed"].at[slot])
            return acc

        acc = lax.fori_loop(0, num_k, step, regs.zeros((_ROWS, block_m)))
        if per_channel:  # one scale per output channel factors out of the sum
            acc = acc * spread(regs.load(s["pc"].at[wg], 0).astype(jnp.float32), acc.shape, 0)
        # The f32 tile leaves in 64-column pieces through one 16 KB buffer per warpgroup.
        out_smem = s["out"].at[wg]
        for j in range(block_m // 64):
            if j:
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the buffer's previous piece is out
            out_smem[...] = acc[:, j * 64:(j + 1) * 64]
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_smem, o_ref.at[rows, pl.ds(m0 + j * 64, 64)])
        plgpu.wait_smem_to_gmem(0)


# --- Public wrapper ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_m: rows of x per CTA (wgmma's N, a multiple of 64 up to 256); block_k: values of K per
    step (a power of two >= 128; int4 tiles hold block_k / 2 bytes; a tile holds whole groups or
    lies inside one); depth: TMA ring slots. A CTA always covers 128 output channels (two
    warpgroups of 64)."""

    block_m: int = 128
    block_k: int = 128
    depth: int = 3

    def __post_init__(self):
        if self.block_m % 64 or not 64 <= self.block_m <= 256:
            raise ValueError(f"block_m={self.block_m} must be a multiple of 64 in [64, 256]")
        if self.block_k % 128 or self.block_k & (self.block_k - 1):
            raise ValueError(f"block_k={self.block_k} must be a power of two >= 128")
        if self.depth < 1:
            raise ValueError(f"depth={self.depth} must be at least 1")

    @classmethod
    def get_default(cls, m: int, n: int, k: int) -> "BlockSizes":
        """128 x 128 output tiles, 128 values of K a step, three ring slots: 210 KB of shared memory
        for int8 (96 KB of x^T, 48 KB of weight bytes, 32 KB of dequantized tiles, 32 KB for the
        output), 186 KB for int4. Sized to an H100's 227 KB, not yet timed on one."""
        del m, n, k
        return cls()


def supports(fmt: str, group_size: int | None, k: int, n: int | None = None, dtype=None) -> bool:
    """Whether quant_matmul_mosaic takes a weight of this format and group size (None: per output
    channel) over K inputs (and N outputs, x's dtype, where given); otherwise use the Triton kernel
    (`pallas_kernels.quant_matmul`) or XLA's product (`quant_matmul_reference`)."""
    group = k if group_size is None else group_size
    if fmt not in FORMATS or group <= 0 or k % group:
        return False
    if n is not None and n % BLOCK_N:
        return False
    if dtype is not None and jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    if k % BlockSizes.block_k:
        return False
    return (group == k and fmt != "int4") or not (group & (group - 1) or not 16 <= group <= MAX_GROUP)


def _forward(x2, values, scales, mins, *, fmt, group, bs, interpret):
    """The kernel's launch: x2 [M, K] (M > 0) -> [M, N] f32."""
    (m, k), n = x2.shape, values.shape[0]
    int4 = fmt == "int4"
    per_channel = group == k and not int4
    block_k, bm, dt = bs.block_k, bs.block_m, x2.dtype
    mp = round_up(m, bm)
    x2 = pad_axis(x2, 0, mp)  # padded rows: zeros, sliced off below
    width = block_k // 2 if int4 else block_k
    # x^T [K, Mp], its rows in the order of the dequantized tiles' columns. An int4 tile is [low
    # nibbles | high nibbles] of its bytes: column half * width + b holds value g*G + half*G/2 + j of
    # the byte's group g, j its place in the group.
    if int4 and group <= block_k:  # a tile holds whole groups: (t, g, half, j) -> (t, half, g, j)
        xt = x2.reshape(mp, k // block_k, block_k // group, 2, group // 2).transpose(1, 3, 2, 4, 0)
    elif int4:  # a group spans tiles, `width` bytes each: (g, half, c, b) -> (g, c, half, b)
        xt = x2.reshape(mp, k // group, 2, group // 2 // width, width).transpose(1, 3, 2, 4, 0)
    else:
        xt = x2.T
    xt = xt.reshape(k, mp)  # (K, Mp)
    tile_groups = 1 if per_channel else max(1, block_k // group)
    if per_channel:
        args = [xt, values, scales.reshape(n)]
    else:  # [K/G, N]: a group's scales are contiguous over the output channels
        args = [xt, values, scales.T] + ([mins.T] if mins is not None else [])
    depth = bs.depth
    scratch = dict(
        xt=smem((depth, block_k, bm), dt, True),
        v=plgpu.SMEM((depth, _WGS, _ROWS, width), values.dtype, transforms=_byte_transforms(width)),
        a=smem((_WGS, _ROWS, block_k), dt, True),
        out=plgpu.SMEM((_WGS, _ROWS, 64), jnp.float32, transforms=_F32_TRANSFORMS),
        consumed=plgpu.Barrier(num_arrivals=_WGS, num_barriers=depth))
    copies = 1 + _WGS  # x^T, and each warpgroup's bytes
    if per_channel:
        scratch.update(pc=smem((_WGS, _ROWS), scales.dtype), pc_bar=plgpu.Barrier(num_arrivals=1, num_barriers=_WGS))
    else:
        scratch["s"] = smem((depth, _WGS, tile_groups, _ROWS), scales.dtype)
        copies += _WGS
        if mins is not None:
            scratch["mins"] = smem((depth, _WGS, tile_groups, _ROWS), mins.dtype)
            copies += _WGS
    scratch["loaded"] = plgpu.Barrier(num_arrivals=copies, num_barriers=depth)
    smem_bytes = (depth * (block_k * bm * dt.itemsize + _WGS * _ROWS * width)
                  + _WGS * _ROWS * (block_k * dt.itemsize + 256))
    if smem_bytes > _H100_SMEM:
        raise ValueError(f"quant_matmul_mosaic: {bs} needs {smem_bytes} B of shared memory (an H100 has {_H100_SMEM})")

    def run(interp, *args):
        return launch(_kernel, f"mosaic_quant_matmul_{fmt}", (mp // bm, n // BLOCK_N), ("m", "n"),
                      jax.ShapeDtypeStruct((n, mp), jnp.float32), scratch, interp, wgs=_WGS, fmt=fmt,
                      group=group, per_channel=per_channel, has_mins=mins is not None, block_m=bm,
                      block_k=block_k, depth=depth, num_k=k // block_k)(*args)

    if interpret is None:
        out = by_platform(run, None, *args)
    else:  # a bool, or interpreter parameters (which by_platform would turn into True)
        out = run(interpret, *args)
    return out[:, :m].T  # (M, N)


_product = with_x_gradient(_forward)  # the Triton kernel's backward: XLA's product


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "block_sizes", "interpret"))
def quant_matmul_mosaic(x, values, scales, mins=None, *, fmt, group_size=None, block_sizes=None,
                        interpret=None):
    """x @ W^T for a weight W [N, K] stored quantized along K, on Hopper (Mosaic GPU). The same
    operands and result as `pallas_kernels.quant_matmul`; differentiable with respect to x only.

    Args:
      x: [..., K] activations, bfloat16 or float16 (the product runs in this dtype, accumulates in f32).
      values: [N, K] int8 ("int8"), [N, K / 2] uint8 ("int4", GGUF's nibble order in each group), or
        [N, K] float8_e4m3fn ("fp8").
      scales: [N, K / G] ([N, 1] per output channel), any float dtype.
      mins: [N, K / G] or None: int4 with minimums (GGUF Q4_1), value = nibble * scale + min.
      fmt: "int8" | "int4" | "fp8" (`supports` says which shapes).
      group_size: values per scale along K; None for one scale per output channel (int8, fp8).
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(M, N, K)`.
      interpret: None: the Mosaic GPU interpreter when lowered for CPU, the compiled kernel when
        lowered for a GPU; True / False force one; or `interpreter(detect_races=True)`.

    Returns:
      [..., N] float32.
    """
    n, k, group = check_operands(x, values, scales, mins, fmt, group_size)
    if not supports(fmt, group_size, k, n, x.dtype):
        raise ValueError(
            f"quant_matmul_mosaic: no kernel for {fmt} with group size {group_size} at K={k}, N={n}, "
            f"x {x.dtype}: it takes int8 and fp8 (per channel or groups) and int4 (groups of 16-{MAX_GROUP}, "
            f"powers of two), N a multiple of {BLOCK_N}, K of 128, x bfloat16 or float16")
    x2 = x.reshape(-1, k)  # (M, K)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*x.shape[:-1], n), jnp.float32)
    bs = block_sizes or BlockSizes.get_default(m, n, k)
    if k % bs.block_k:
        raise ValueError(f"quant_matmul_mosaic: K={k} is not a multiple of the K tile of {bs}")
    static = (("fmt", fmt), ("group", group), ("bs", bs), ("interpret", interpret), ("x_dtype", x2.dtype))
    return _product(x2, values, scales, mins, static).reshape(*x.shape[:-1], n)
