"""x @ W^T with W quantized (int8, int4, fp8 weight-only), as one Pallas Triton kernel.

The weight is in the inference layout [N out, K in], quantized along K (llama_jax.quant.QArray with
axis -1): int8 q with one scale per output channel or per group of G along K; int4, two nibbles a
byte packed as GGUF packs a block (within each group of G values, byte j holds value j in its low
nibble and value j + G/2 in its high one), q = nibble - 8 or, with mins, value = nibble * scale +
min; fp8 e4m3 with one scale per output channel. Each program reads its [block_n, block_k] tiles of
quantized bytes once, dequantizes them in registers and feeds them to the MMA, so a decode step
moves the stored width of the weights and nothing more.

Products are computed as W_tile @ x_tile^T ([block_n, block_k] @ [block_k, block_m]): a decode step
has few rows of x (M <= 16), and putting the weight on the MMA's large side lets block_m stay 16.
Decode (M <= 16): programs over output channels, and over K splits when N alone gives too few
programs to keep an H100's memory busy; the splits' f32 partials are summed by XLA (deterministic,
and a few KB). Prefill (M > 16): the same kernel with 128 x 128 tiles, programs over (M, N) tiles.

int4 needs no unpacking shuffle: the low nibbles of a tile's bytes hold the first half of each group
and the high nibbles the second half, so the kernel makes two products, each against the columns of
x those nibbles multiply (gathered by index arithmetic on the load, contiguous runs of G/2).

Numerics match `quant_matmul_reference` (below) and `llama_jax.quant.qlinear`, the model's XLA
product, which the tests compare against (pallas_kernels imports nothing of llama_jax): per-channel int8 / fp8 values enter the product
exactly (in x's dtype) and the scale multiplies the f32 result; grouped formats are dequantized in
f32 (q * scale + min), cast once to x's dtype, and accumulated in f32.

Gradient: with respect to x only (the weight is frozen, as QLoRA's base is), dx = dy @ W as XLA's
product with the weight dequantized into it (`quant_matmul_reference`'s operands).

Backend: Triton (see `_common`).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import by_platform, dot, next_pow2, triton_params

FORMATS = ("int8", "int4", "fp8")
DECODE_ROWS = 16  # the most rows of x the decode tiles take (tl.dot needs 16 on each side)
MAX_GROUP = 512  # the widest group a tile takes whole (int4 is always grouped: GGUF's 32, or 64-256)
_H100_PROGRAMS = 4 * 132  # four programs per SM keep enough loads in flight to near HBM bandwidth


def _quant_matmul_kernel(*refs, fmt, group, per_channel, has_mins, m, n, k, block_m, block_n, block_k,
                         tiles_per_split):
    if has_mins:
        x_ref, v_ref, s_ref, min_ref, o_ref = refs
    else:
        (x_ref, v_ref, s_ref, o_ref), min_ref = refs, None
    mb, nb, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    cdt = x_ref.dtype
    # Rows past the end are clamped rather than masked: they load a real row, and their results are
    # never stored. So full tiles load without masks.
    rows_m = mb * block_m + jnp.arange(block_m)
    rows_n = nb * block_n + jnp.arange(block_n)
    load_m, load_n = jnp.minimum(rows_m, m - 1), jnp.minimum(rows_n, n - 1)
    # A tile spans block_k values of K: block_k bytes of int8 / fp8, block_k / 2 of int4.
    width = block_k // 2 if fmt == "int4" else block_k
    stored_k = k // 2 if fmt == "int4" else k
    half = group // 2  # int4: bytes per group
    tile_groups = block_k // group  # groups a tile spans (the wrapper makes block_k a multiple of G)

    def load(ref, rows, cols, mask):
        idx = ref.at[rows[:, None], cols[None, :]]
        return plt.load(idx) if mask is None else plt.load(idx, mask=mask[None, :], other=jnp.zeros((), ref.dtype))

    def body(t, acc, masked):
        cols = t * width + jnp.arange(width)  # columns of the stored values
        mask = cols < stored_k if masked else None
        v = load(v_ref, load_n, cols, mask)
        if fmt == "int4":
            groups = lax.div(cols, half)
            x_lo = groups * group + (cols - groups * half)  # the x columns low nibbles multiply
            parts = [((v & 15), x_lo), ((v >> 4), x_lo + half)]
        else:
            parts = [(v, cols)]
        if not per_channel:  # the tile's scales (and mins), one per group: (block_n, groups, 1)
            gcols = t * tile_groups + jnp.arange(tile_groups)
            gmask = gcols < k // group if masked else None
            scale = load(s_ref, load_n, gcols, gmask).astype(jnp.float32)[:, :, None]
            w_min = load(min_ref, load_n, gcols, gmask).astype(jnp.float32)[:, :, None] if has_mins else None
        for q, x_cols in parts:
            w = q.astype(jnp.float32)
            if fmt == "int4" and not has_mins:
                w = w - 8.0
            if not per_channel:
                w = w.reshape(block_n, tile_groups, width // tile_groups)  # (block_n, groups, G stored)
                w = (w * scale if w_min is None else w * scale + w_min).reshape(block_n, width)
            x = load(x_ref, load_m, x_cols, None if mask is None else x_cols < k)
            acc = acc + dot(w.astype(cdt), x, trans_b=True)  # (block_n, block_m) f32
        return acc

    num_tiles = pl.cdiv(stored_k, width)
    start = split * tiles_per_split
    stop = jnp.minimum(start + tiles_per_split, num_tiles)
    n_full = jnp.clip(stored_k // width, start, jnp.maximum(stop, start))  # only the last may be ragged
    acc = jnp.zeros((block_n, block_m), jnp.float32)
    acc = lax.fori_loop(start, n_full, functools.partial(body, masked=False), acc)
    if stored_k % width:
        acc = lax.fori_loop(n_full, stop, functools.partial(body, masked=True), acc)
    if per_channel:  # one scale per output channel factors out of the sum
        acc = acc * plt.load(s_ref.at[load_n]).astype(jnp.float32)[:, None]
    # The output is [splits * M, N]; acc is its (N, M) tile, transposed.
    out_rows = split * m + rows_m
    plt.store(o_ref.at[out_rows[None, :], rows_n[:, None]], acc,
              mask=(rows_n < n)[:, None] & (rows_m < m)[None, :])


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_m: rows of x per program (at least 16); block_n: output channels per program; block_k:
    values of K per loop step (for int4 the tile holds block_k / 2 bytes); k_splits: programs that
    share one output tile, each over a run of K tiles, their f32 partials summed afterwards."""

    block_m: int = DECODE_ROWS
    block_n: int = 32
    block_k: int = 256
    k_splits: int = 1
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def get_default(cls, m: int, n: int, k: int) -> "BlockSizes":
        """Decode (m <= 16): 32 output channels by 256 values of K per step (8 KB tiles of int8,
        4 KB of int4; 55 to 128 registers by format, so four or more programs fit on an SM), K split until
        there are about four programs per H100 SM, each split at least two tiles long. Prefill:
        128 x 128 output tiles, 64 values of K per step (8 warps, 128 registers, 64 KB of shared
        memory: two programs an SM). Chosen from ptxas' figures for an H100 (docs/GPU_COMPILE.md),
        not timed on one."""
        if m > DECODE_ROWS:
            return cls(block_m=min(128, next_pow2(m)), block_n=128, block_k=64, num_warps=8, num_stages=3)
        block_k, n_blocks, splits = 256, pl.cdiv(n, 32), 1
        while n_blocks * splits * 2 <= _H100_PROGRAMS and k // (splits * 2) >= 2 * block_k:
            splits *= 2
        return cls(block_k=block_k, k_splits=splits)


def _tiles_hold_groups(fmt, group, k) -> bool:
    # A tile holds whole groups, so that its scales are one row per group (the tile's width, a power
    # of two, is a multiple of a power-of-two group). int4 always has groups (nibble order is per group).
    return not ((group != k or fmt == "int4") and (group & (group - 1) or group > MAX_GROUP))


def supports(fmt: str, group_size: int | None, k: int) -> bool:
    """Whether quant_matmul takes a weight of this format and group size (None: per output channel)
    over K inputs; a caller falls back to XLA's product (quant_matmul_reference) otherwise."""
    group = k if group_size is None else group_size
    return fmt in FORMATS and group > 0 and k % group == 0 and _tiles_hold_groups(fmt, group, k)


def check_operands(x, values, scales, mins, fmt, group_size):
    """K and G from the operands; raises ValueError on a mismatch."""
    if fmt not in FORMATS:
        raise ValueError(f"quant_matmul: format {fmt!r} is not one of {FORMATS}")
    if values.ndim != 2 or scales.ndim != 2:
        raise ValueError(f"quant_matmul: values and scales must be 2-D [N, ...], got {values.shape}, {scales.shape}")
    n, stored = values.shape
    k = 2 * stored if fmt == "int4" else stored
    if x.shape[-1] != k:
        raise ValueError(f"quant_matmul: x has {x.shape[-1]} features, the {fmt} weight {values.shape} takes {k}")
    group = k if group_size is None else group_size
    if k % group:
        raise ValueError(f"quant_matmul: group size {group} does not divide K={k}")
    if not _tiles_hold_groups(fmt, group, k):
        raise ValueError(f"quant_matmul: {fmt} groups must be a power of two of at most {MAX_GROUP} values, "
                         f"got {group}" + (" (int4 per output channel is not supported)" if group == k else ""))
    if scales.shape != (n, k // group):
        raise ValueError(f"quant_matmul: scales {scales.shape}, expected {(n, k // group)}")
    if mins is not None and fmt != "int4":
        raise ValueError("quant_matmul: mins are for int4 only")
    if mins is not None and mins.shape != scales.shape:
        raise ValueError(f"quant_matmul: mins {mins.shape} must match scales {scales.shape}")
    want = {"int8": jnp.int8, "int4": jnp.uint8, "fp8": jnp.float8_e4m3fn}[fmt]
    if values.dtype != want:
        raise ValueError(f"quant_matmul: {fmt} values must be {jnp.dtype(want).name}, got {values.dtype}")
    return n, k, group


def _forward(x2, values, scales, mins, *, fmt, group, bs, interpret):
    """The kernel's launch: x2 [M, K] (M > 0) -> [M, N] f32."""
    (m, k), n = x2.shape, values.shape[0]
    # tl.dot takes at least 16 along each side; an int4 tile's products are block_k / 2 deep.
    sizes = (bs.block_m, bs.block_n, bs.block_k // 2)
    if min(sizes) < 16 or any(b & (b - 1) for b in sizes):
        raise ValueError(f"quant_matmul: block_m, block_n and block_k / 2 must be powers of two of at least 16: {bs}")
    # One scale per output channel factors out of the sum (int8, fp8: as the reference computes it).
    per_channel = group == k and fmt != "int4"
    if not per_channel:  # a tile spans whole groups
        bs = dataclasses.replace(bs, block_k=max(bs.block_k, group))
    tile = bs.block_k // 2 if fmt == "int4" else bs.block_k
    num_tiles = pl.cdiv(values.shape[1], tile)
    tiles_per_split = pl.cdiv(num_tiles, min(bs.k_splits, num_tiles))
    splits = pl.cdiv(num_tiles, tiles_per_split)
    s_arg = scales.reshape(n) if per_channel else scales
    args = [x2, values, s_arg] + ([mins] if mins is not None else [])

    def kernel(interp, *args):
        return pl.pallas_call(
            functools.partial(_quant_matmul_kernel, fmt=fmt, group=group, per_channel=per_channel,
                              has_mins=mins is not None, m=m, n=n, k=k, block_m=bs.block_m, block_n=bs.block_n,
                              block_k=bs.block_k, tiles_per_split=tiles_per_split),
            grid=(pl.cdiv(m, bs.block_m), pl.cdiv(n, bs.block_n), splits),
            out_shape=jax.ShapeDtypeStruct((splits * m, n), jnp.float32),
            compiler_params=triton_params(bs.num_warps, bs.num_stages),
            interpret=interp,
            name="quant_matmul",
        )(*args)
    out = by_platform(kernel, interpret, *args)
    if splits > 1:  # (splits, M, N) partials, summed in a fixed order
        out = jnp.sum(out.reshape(splits, m, n), axis=0)
    return out


def with_x_gradient(forward):
    """forward(x2, values, scales, mins, **opts) -> [M, N] f32, as product(x2, values, scales, mins,
    static), static being the opts and x's dtype as (name, value) pairs. The weight is frozen
    (weight-only quantization serves inference and QLoRA's frozen base): only x gets a gradient. Its
    backward, dx = dy @ W, is XLA's product with the weight dequantized into it (the reference
    below), one per layer per step: a training step is bound by its FLOPs, not by the weight's bytes
    as a decode step is."""
    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def product(x2, values, scales, mins, static):
        opts = dict(static)
        del opts["x_dtype"]  # the backward's
        return forward(x2, values, scales, mins, **opts)

    def product_fwd(x2, values, scales, mins, static):
        return product(x2, values, scales, mins, static), (values, scales, mins)

    def product_bwd(static, residuals, dy):
        values, scales, mins = residuals
        opts = dict(static)
        dtype = opts["x_dtype"]
        dx = transposed_product(dy, values, scales, mins, fmt=opts["fmt"], group_size=opts["group"], dtype=dtype)
        return dx.astype(dtype), zero_cotangent(values), zero_cotangent(scales), zero_cotangent(mins)

    product.defvjp(product_fwd, product_bwd)
    return product


_product = with_x_gradient(_forward)


def zero_cotangent(a):
    """The cotangent of a frozen operand: zeros (float0 for integer arrays, as JAX requires)."""
    if a is None:
        return None
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, jax.dtypes.float0)


@functools.partial(jax.jit, static_argnames=("fmt", "group_size", "block_sizes", "interpret"))
def quant_matmul(x, values, scales, mins=None, *, fmt, group_size=None, block_sizes=None, interpret=None):
    """x @ W^T for a weight W [N, K] stored quantized along K (a QArray in the inference layout,
    axis -1, passed as its arrays). Differentiable with respect to x; the weight is frozen (its
    cotangents are zeros).

    Args:
      x: [..., K] activations, bf16 / f16 / f32 (the product runs in this dtype, accumulates in f32).
      values: [N, K] int8 ("int8"), [N, K / 2] uint8 ("int4", GGUF's nibble order in each group),
        or [N, K] float8_e4m3fn ("fp8").
      scales: [N, K / G] (G = group_size; [N, 1] per output channel), any float dtype.
      mins: [N, K / G] or None: int4 with minimums (GGUF Q4_1), value = nibble * scale + min.
      fmt: "int8" | "int4" | "fp8".
      group_size: values per scale along K; None for one scale per output channel.
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(M, N, K)` (M = rows of x).
      interpret: run the Pallas interpreter; None: the interpreter when lowered for CPU, the
        compiled kernel when lowered for a GPU.

    Returns:
      [..., N] float32.
    """
    n, k, group = check_operands(x, values, scales, mins, fmt, group_size)
    x2 = x.reshape(-1, k)  # (M, K)
    if not jnp.issubdtype(x2.dtype, jnp.floating):
        x2 = x2.astype(jnp.float32)
    m = x2.shape[0]
    if m == 0:
        return jnp.zeros((*x.shape[:-1], n), jnp.float32)
    bs = block_sizes or BlockSizes.get_default(m, n, k)
    static = (("fmt", fmt), ("group", group), ("bs", bs), ("interpret", interpret), ("x_dtype", x2.dtype))
    return _product(x2, values, scales, mins, static).reshape(*x.shape[:-1], n)


# --- Reference ------------------------------------------------------------------------------------


def dequantize_reference(values, scales, mins=None, *, fmt, group_size=None, dtype=jnp.float32):
    """The weight [N, K] the operands stand for, computed in f32 (q * scale + min) and cast once."""
    n, stored = values.shape
    k = 2 * stored if fmt == "int4" else stored
    group = k if group_size is None else group_size
    if fmt == "int4":  # byte j of a group: value j (low nibble), value j + G/2 (high nibble)
        v = values.reshape(n, k // group, group // 2)
        q = jnp.concatenate([v & 15, v >> 4], axis=-1).astype(jnp.float32)  # (N, groups, G)
        if mins is None:
            q = q - 8.0
    else:
        q = values.astype(jnp.float32).reshape(n, k // group, group)
    w = q * scales.astype(jnp.float32)[:, :, None]
    if mins is not None:
        w = w + mins.astype(jnp.float32)[:, :, None]
    return w.reshape(n, k).astype(dtype)


def quant_matmul_reference(x, values, scales, mins=None, *, fmt, group_size=None):
    """quant_matmul in plain jnp (XLA's GPU compiler fuses the dequantization into the dot): the same
    operands, the same rounding (per-channel values enter exactly and the scale multiplies the f32
    result; grouped formats are dequantized in f32 and cast to x's dtype)."""
    cdt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if fmt != "int4" and group_size is None:
        y = jnp.einsum("...K,NK->...N", x.astype(cdt), values.astype(cdt), preferred_element_type=jnp.float32)
        return y * scales.astype(jnp.float32).reshape(-1)
    w = dequantize_reference(values, scales, mins, fmt=fmt, group_size=group_size, dtype=cdt)
    return jnp.einsum("...K,NK->...N", x.astype(cdt), w, preferred_element_type=jnp.float32)


def transposed_product(dy, values, scales, mins, *, fmt, group_size, dtype):
    """dy [M, N] @ W [N, K] -> [M, K] f32, operands in `dtype` (x's), accumulated in f32."""
    cdt = dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32
    if fmt != "int4" and (group_size is None or group_size == values.shape[1]):
        dy = dy.astype(jnp.float32) * scales.astype(jnp.float32).reshape(-1)  # the per-channel scale, first
        return jnp.einsum("MN,NK->MK", dy.astype(cdt), values.astype(cdt), preferred_element_type=jnp.float32)
    w = dequantize_reference(values, scales, mins, fmt=fmt, group_size=group_size, dtype=cdt)
    return jnp.einsum("MN,NK->MK", dy.astype(cdt), w, preferred_element_type=jnp.float32)
