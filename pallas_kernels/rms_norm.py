"""Fused RMSNorm, optionally with the residual add before it, as Pallas Triton kernels.

Backend: Triton (see `_common`); the same code runs on CPU in interpret mode.

Numerics follow Hugging Face's LlamaRMSNorm: normalize in f32, cast to the input dtype, then
multiply by the weight. With a residual, h = x + residual is added in f32 and rounded to
x.dtype first (that rounded h is what the next layer's residual stream holds), then normalized.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels._common import by_platform, next_pow2, round_up, triton_params


def _row_tile(ref, rows, cols, d):
    """Masked load of rows x cols (both 1-D index vectors) of a 2-D ref, as f32."""
    mask = (rows < ref.shape[0])[:, None] & (cols < d)[None, :]
    return plt.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0.0).astype(jnp.float32)


def _rms_norm_fwd_kernel(*refs, eps, block_rows, has_residual):
    if has_residual:
        x_ref, r_ref, w_ref, y_ref, h_ref, rstd_ref = refs
    else:
        x_ref, w_ref, y_ref, rstd_ref = refs
    n, d = x_ref.shape
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    cols = jnp.arange(next_pow2(d))  # Triton tiles are powers of two; the tail is masked
    row_ok = rows < n
    mask = row_ok[:, None] & (cols < d)[None, :]
    idx = (rows[:, None], cols[None, :])

    h = _row_tile(x_ref, rows, cols, d)
    if has_residual:
        h = (h + _row_tile(r_ref, rows, cols, d)).astype(h_ref.dtype)
        plt.store(h_ref.at[idx], h, mask=mask)
        h = h.astype(jnp.float32)
    # Padded lanes load as 0, so the sum is over the d real columns.
    rstd = lax.rsqrt(jnp.sum(h * h, axis=1) / d + eps)  # (block_rows,)
    w = plt.load(w_ref.at[cols], mask=cols < d, other=0.0).astype(jnp.float32)
    # Cast to the input dtype before the weight multiply, as Hugging Face does.
    normed = (h * rstd[:, None]).astype(y_ref.dtype).astype(jnp.float32)
    plt.store(y_ref.at[idx], (normed * w[None, :]).astype(y_ref.dtype), mask=mask)
    plt.store(rstd_ref.at[rows], rstd, mask=row_ok)


def _rms_norm_bwd_kernel(*refs, block_rows, rows_per_program, has_dh):
    if has_dh:
        h_ref, w_ref, rstd_ref, dy_ref, dh_ref, dx_ref, dw_ref = refs
    else:
        h_ref, w_ref, rstd_ref, dy_ref, dx_ref, dw_ref = refs
    n, d = h_ref.shape
    p = pl.program_id(0)
    cols = jnp.arange(next_pow2(d))
    col_ok = cols < d
    w = plt.load(w_ref.at[cols], mask=col_ok, other=0.0).astype(jnp.float32)
    first_row = p * rows_per_program
    num_tiles = lax.div(jnp.clip(n - first_row, 0, rows_per_program) + block_rows - 1, block_rows)

    def body(t, dw):
        rows = first_row + t * block_rows + jnp.arange(block_rows)
        row_ok = rows < n
        h = _row_tile(h_ref, rows, cols, d)
        dy = _row_tile(dy_ref, rows, cols, d)
        rstd = plt.load(rstd_ref.at[rows], mask=row_ok, other=0.0)
        h_hat = h * rstd[:, None]
        # y = cast(h_hat) * w; the casts pass gradients straight through.
        dn = dy * w[None, :]
        c = jnp.sum(dn * h_hat, axis=1) / d  # (block_rows,)
        dh = (dn - h_hat * c[:, None]) * rstd[:, None]
        if has_dh:  # the residual form also returns h, whose cotangent adds here
            dh = dh + _row_tile(dh_ref, rows, cols, d)
        mask = row_ok[:, None] & col_ok[None, :]
        plt.store(dx_ref.at[rows[:, None], cols[None, :]], dh.astype(dx_ref.dtype), mask=mask)
        normed = h_hat.astype(h_ref.dtype).astype(jnp.float32)
        return dw + jnp.sum(dy * normed, axis=0)

    dw = lax.fori_loop(0, num_tiles, body, jnp.zeros(cols.shape, jnp.float32))
    # One partial dweight row per program; the wrapper sums them.
    plt.store(dw_ref.at[p, cols], dw, mask=col_ok)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles for the RMSNorm kernels.

    block_rows: rows per program in the forward (and rows per loop step in the backward).
    bwd_programs: programs in the backward; each loops over a contiguous chunk of rows and
      writes one partial dweight row, so fewer programs means a smaller dweight reduction.
    """

    block_rows: int = 1
    bwd_programs: int = 512
    num_warps: int = 8
    num_stages: int = 1

    @classmethod
    def get_default(cls, d: int) -> "BlockSizes":
        d_pad = next_pow2(d)
        # About 4k elements per tile: one row of a 4096-wide model, several of a narrow one.
        block_rows = max(1, min(16, 4096 // d_pad))
        num_warps = max(1, min(8, block_rows * d_pad // 512))
        return cls(block_rows=block_rows, num_warps=num_warps)


def _forward(x, weight, residual, eps, bs, interpret):
    n, d = x.shape
    has_residual = residual is not None
    out_shape = [jax.ShapeDtypeStruct((n, d), x.dtype)]
    if has_residual:
        out_shape.append(jax.ShapeDtypeStruct((n, d), x.dtype))
    out_shape.append(jax.ShapeDtypeStruct((n,), jnp.float32))
    outs = pl.pallas_call(
        functools.partial(
            _rms_norm_fwd_kernel, eps=eps, block_rows=bs.block_rows, has_residual=has_residual),
        grid=(pl.cdiv(n, bs.block_rows),),
        out_shape=out_shape,
        compiler_params=triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="rms_norm_fwd",
    )(*([x, residual, weight] if has_residual else [x, weight]))
    if has_residual:
        y, h, rstd = outs
        return (y, h), (h, weight, rstd)
    y, rstd = outs
    return y, (x, weight, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _rms_norm(x, weight, residual, eps, bs, interpret):
    return _forward(x, weight, residual, eps, bs, interpret)[0]


def _rms_norm_fwd(x, weight, residual, eps, bs, interpret):
    out, saved = _forward(x, weight, residual, eps, bs, interpret)
    # A 0-d array stands in for the residual's dtype (custom_vjp residuals must be arrays).
    return out, (saved, None if residual is None else jnp.zeros((), residual.dtype))


def _rms_norm_bwd(eps, bs, interpret, res, g):
    (h, weight, rstd), residual_like = res
    has_dh = residual_like is not None
    dy, dh = g if has_dh else (g, None)
    n, d = h.shape
    block_rows = bs.block_rows
    rows_per_program = round_up(pl.cdiv(n, bs.bwd_programs), block_rows)
    programs = pl.cdiv(n, rows_per_program)
    dx, dw_partial = pl.pallas_call(
        functools.partial(
            _rms_norm_bwd_kernel, block_rows=block_rows, rows_per_program=rows_per_program,
            has_dh=has_dh),
        grid=(programs,),
        out_shape=[jax.ShapeDtypeStruct((n, d), h.dtype),
                   jax.ShapeDtypeStruct((programs, d), jnp.float32)],
        compiler_params=triton_params(bs.num_warps, bs.num_stages),
        interpret=interpret,
        name="rms_norm_bwd",
    )(*([h, weight, rstd, dy, dh] if has_dh else [h, weight, rstd, dy]))
    dweight = jnp.sum(dw_partial, axis=0).astype(weight.dtype)
    if has_dh:  # h = x + residual: both get dh
        return dx, dweight, dx.astype(residual_like.dtype)
    return dx, dweight, None


_rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


@functools.partial(jax.jit, static_argnames=("eps", "block_sizes", "interpret"))
def rms_norm(x, weight, residual=None, *, eps=1e-5, block_sizes=None, interpret=None):
    """RMSNorm over the last axis, optionally fused with the residual add before it.

    Args:
      x: [..., D] activations.
      weight: [D] scale.
      residual: optional, same shape as x. Then h = x + residual (added in f32, stored in
        x.dtype) is normalized and returned too.
      eps: added to the mean square.
      block_sizes: a `BlockSizes`; default `BlockSizes.get_default(D)`.
      interpret: run the Pallas interpreter; None: the interpreter when lowered for CPU, the
        compiled kernel when lowered for a GPU.

    Returns:
      y [..., D] in x.dtype, or (y, h) when residual is given.
    """
    d = x.shape[-1]
    bs = block_sizes or BlockSizes.get_default(d)
    x2 = x.reshape(-1, d)  # (N, D)
    r2 = None if residual is None else residual.reshape(-1, d)
    out = by_platform(lambda interp, *a: _rms_norm(*a, eps, bs, interp), interpret, x2, weight, r2)
    if residual is None:
        return out.reshape(x.shape)
    y, h = out
    return y.reshape(x.shape), h.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("eps",))
def rms_norm_reference(x, weight, residual=None, *, eps=1e-5):
    """Plain-jnp RMSNorm with Hugging Face numerics; same contract as `rms_norm`."""
    h = x
    if residual is not None:  # add in f32, keep the stream in x.dtype
        h = (x.astype(jnp.float32) + residual.astype(jnp.float32)).astype(x.dtype)
    h32 = h.astype(jnp.float32)
    normed = h32 * lax.rsqrt(jnp.mean(h32 * h32, axis=-1, keepdims=True) + eps)
    y = (normed.astype(x.dtype) * weight).astype(x.dtype)
    return y if residual is None else (y, h)
