"""Quantized linear layers on the CPU: `qlinear`, x @ W^T for a weight W [N, K] held as the arrays of
llama_jax.quant's QArray in its inference layout (axis -1: each output row contiguous along the input,
in groups with their own scale), which is GGUF's own layout, so Q8_0, Q4_0 and Q4_1 blocks are read as
they are stored.

XLA:CPU does not fuse a dequantization into a dot: it writes the whole f32 weight first, and int8 /
int4 products ran at 0.05-0.4x of float32 (benchmarks/quant_matvec.py). Here a decode step's few rows
read the quantized bytes once and expand them to f32 in registers (on the threads `matvec` spins),
against the f32 activations as they are: the dequantized product up to f32 summation order, so a
quantized model gives its float32 dequantization's logits (llama.cpp rounds the activations to int8
for integer products, an error of its own on top of the weights'). Many rows (prefill) multiply f32 panels of the weight, dequantized
in cache, with MKL's sgemm. csrc/quant.cc says how.

The reference is `llama_jax.quant.dequantize` followed by a float product (tests/test_cpu_quant.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from cpu_kernels._library import QLINEAR, require

FORMATS = ("int8", "int4", "fp8")
# Products of this many rows of x or more multiply dequantized panels (csrc/quant.cc's kGemmRows).
PANEL_ROWS = 16
_VALUES = {"int8": jnp.int8, "int4": jnp.uint8, "fp8": jnp.float8_e4m3fn}


def supports(format: str, group_size: int | None, k: int) -> bool:
    """Whether `qlinear` takes a weight of this format, group size (None: one scale per output row)
    and input size k: k a multiple of 32 (of 64 for int4), groups of a multiple of 32 that divide k,
    and fp8 with one scale per output row only."""
    if format not in FORMATS:
        return False
    g = k if group_size is None else group_size
    if k % (64 if format == "int4" else 32) or g < 1 or g % 32 or k % g:
        return False
    return format != "fp8" or g == k


def _call(x, values, scales, mins, format, group_size, transposed):
    require()
    n = values.shape[0]
    k = values.shape[1] * (2 if format == "int4" else 1)
    out = jax.ShapeDtypeStruct((x.shape[0], k if transposed else n), jnp.float32)
    if mins is None:
        mins = jnp.zeros((0,), jnp.float16)
    return jax.ffi.ffi_call(QLINEAR, out, vmap_method="sequential")(
        x, values, scales, mins, format=format, group_size=0 if group_size is None else group_size,
        transposed=transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _qlinear(x, values, scales, mins, format, group_size):
    return _call(x, values, scales, mins, format, group_size, False)


def _qlinear_fwd(x, values, scales, mins, format, group_size):
    return _call(x, values, scales, mins, format, group_size, False), (values, scales, mins)


def _qlinear_bwd(format, group_size, res, g):
    values, scales, mins = res
    # The weight is frozen (a LoRA base): only x gets a gradient, g @ W through the same panels.
    return _call(g, values, scales, mins, format, group_size, True), None, None, None


_qlinear.defvjp(_qlinear_fwd, _qlinear_bwd)


def qlinear(x, values, scales, mins=None, *, format: str, group_size: int | None):
    """x [..., K] float32 @ W^T -> [..., N] float32, for W [N, K] quantized as a QArray with axis -1
    (`llama_jax.quant.quantize(w, ..., axis=-1)`, or `from_gguf(..., transposed=True)`):

    - values: int8 [N, K] ("int8"); uint8 [N, K / 2], two nibbles a byte packed as GGUF packs a block
      ("int4"); float8_e4m3fn [N, K] ("fp8").
    - scales: [N, K / group_size], or [N, 1] with group_size None (one scale per output row):
      float16 for int4 (as QArray and GGUF keep them), float16 or float32 for int8 and fp8.
    - mins: int4 only, float16 like scales: w = nibble * scale + min (GGUF Q4_1); None: w = (nibble -
      8) * scale (Q4_0). int8 and fp8: w = value * scale.

    `supports(format, group_size, K)` says which shapes it takes. Fewer than PANEL_ROWS rows (decode)
    expand the weight in registers, more go through dequantized panels and sgemm; both equal
    x @ llama_jax.quant.dequantize(W)^T up to f32 rounding. Differentiable with respect to x (the
    weight is frozen: its arrays get no gradient). Runs where the library loads (`cpu_kernels.load`)."""
    if format not in FORMATS:
        raise ValueError(f"qlinear: format {format!r} is not one of {', '.join(FORMATS)}")
    if x.dtype != jnp.float32:
        raise ValueError(f"qlinear: x must be float32, got {x.dtype}")
    if values.ndim != 2 or values.dtype != _VALUES[format]:
        raise ValueError(f"qlinear: values must be 2-D {jnp.dtype(_VALUES[format]).name} for {format}, got "
                         f"{values.dtype} {values.shape}")
    n = values.shape[0]
    k = values.shape[1] * (2 if format == "int4" else 1)
    if x.shape[-1] != k:
        raise ValueError(f"qlinear: x has {x.shape[-1]} features, the weight takes {k}")
    if not supports(format, group_size, k):
        raise ValueError(f"qlinear: {format} with group_size {group_size} and {k} inputs is not supported "
                         "(cpu_kernels.quant.supports)")
    groups = 1 if group_size is None else k // group_size
    dtypes = (jnp.float16,) if format == "int4" else (jnp.float16, jnp.float32)
    if mins is not None and format != "int4":
        raise ValueError(f"qlinear: mins are for int4 only, not {format}")
    for name, a in (("scales", scales), ("mins", mins)):
        if (a is not None or name == "scales") and (a is None or a.shape != (n, groups) or a.dtype not in dtypes):
            got = "None" if a is None else f"{a.dtype} {a.shape}"
            raise ValueError(f"qlinear: {name} must be {' or '.join(jnp.dtype(d).name for d in dtypes)} [{n}, {groups}] "
                             f"for {format}, got {got}")
    y = _qlinear(x.reshape(-1, k), values, scales, mins, format, group_size)
    return y.reshape(*x.shape[:-1], n)

