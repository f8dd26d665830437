"""Matrix products through MKL: `gemm` (sgemm, differentiable) and `matvec` (a decode step's few rows).

- `gemm`: XLA:CPU's GEMM runs at 0.7-0.9x of MKL's on this project's layer shapes, and jaxlib 0.10
  has no working oneDNN path (`--xla_cpu_use_onednn` and its kin change nothing); transformers +
  torch call MKL.
- `matvec`: the products of a decode step's few rows, on threads of our own that spin between
  products: a step is ~200 products of a few MB, one after another, too short for a pool whose
  threads sleep (XLA's own product ran one thread, 19 GB/s here; ours reads 23-25 GB/s).
The reference of both is `gemm_reference` (XLA's dot, f32 accumulation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cpu_kernels._library import GEMM, MATVEC, require

# Products of fewer rows (decode steps, short prompts) go to `matvec`, which reads each weight once
# for all rows; sgemm first copies (packs) the whole weight. Measured on SmolLM2's shapes, 2 cores:
# at 16 rows the 49152 x 576 head took 16.8 ms through matvec against 23.3 through sgemm (the layer
# products were even), at 32 rows 30.8 against 30.3, and past that sgemm wins.
MIN_ROWS = 32


def _call(a, b, trans_a: bool, trans_b: bool):
    require()
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    batch = a.shape[:-2] if a.ndim > 2 else b.shape[:-2]
    out = jax.ShapeDtypeStruct((*batch, m, n), jnp.float32)
    return jax.ffi.ffi_call(GEMM, out, vmap_method="sequential")(a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def gemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in f32 through MKL, op transposing the last two dims when asked. a
    [batch..., p, q], b [batch..., r, s], or either without batch dims (shared by the batch).
    Differentiable (both gradients are GEMMs too)."""
    return _call(a, b, trans_a, trans_b)


def _gemm_fwd(a, b, trans_a, trans_b):
    return _call(a, b, trans_a, trans_b), (a, b)


def _gemm_bwd(trans_a, trans_b, res, g):
    a, b = res
    if a.ndim == 2 and b.ndim > 2:  # a shared by the batch: c^T = op(b)^T op(a)^T, b's case below
        return _gemm_bwd(not trans_b, not trans_a, (b, a), jnp.swapaxes(g, -1, -2))[::-1]
    # c = op(a) op(b): d op(a) = g op(b)^T, d op(b) = op(a)^T g, each transposed back if op was.
    da = _call(b, g, trans_b, True) if trans_a else _call(g, b, False, not trans_b)
    if b.ndim == 2 and a.ndim > 2:  # b shared by the batch: its gradient sums over it
        a2, g2 = a.reshape(-1, *a.shape[-2:]), g.reshape(-1, *g.shape[-2:])
        if not trans_a:  # rows stack: one GEMM over all of them
            a2, g2 = a2.reshape(-1, a.shape[-1]), g2.reshape(-1, g.shape[-1])
            db = _call(g2, a2, True, False) if trans_b else _call(a2, g2, True, False)
        else:
            db = sum(_call(g2[i], a2[i], True, True) if trans_b else _call(a2[i], g2[i], False, False)
                     for i in range(a2.shape[0]))
    else:
        db = _call(g, a, True, trans_a) if trans_b else _call(a, g, not trans_a, False)
    return da, db


gemm.defvjp(_gemm_fwd, _gemm_bwd)


def _matvec_call(x, w, transposed):
    require()
    n = w.shape[0] if transposed else w.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(MATVEC, out, vmap_method="sequential")(x, w, trans=transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matvec(x, w, transposed: bool = False):
    """x [M, K] @ w [K, N] (w [N, K] if transposed) for a few rows M (decode steps), f32: the
    products split over threads that spin between them. Differentiable (the gradients are
    `gemm`'s)."""
    return _matvec_call(x, w, transposed)


matvec.defvjp(lambda x, w, transposed: (_matvec_call(x, w, transposed), (x, w)),
              lambda transposed, res, g: _gemm_bwd(False, transposed, res, g))




def gemm_reference(a, b, trans_a: bool = False, trans_b: bool = False):
    """`gemm`'s contract in plain jnp (XLA's dot, f32 accumulation)."""
    a = jnp.swapaxes(a, -1, -2) if trans_a else a
    b = jnp.swapaxes(b, -1, -2) if trans_b else b
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)
