"""Small helpers shared by the kernels: backend choice, interpret default, padding."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plt

# A finite "minus infinity": exp2(MASK_VALUE - m) underflows to 0 without the inf - inf = NaN
# that a real -inf gives when a whole row is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# jax renamed TritonCompilerParams to CompilerParams; accept either spelling.
_CompilerParams = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")


def triton_params(num_warps: int, num_stages: int):
    """Compiler params that select the Triton backend for `pl.pallas_call` on GPU."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: compile for the GPU when there is one, else run the interpreter."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pads `axis` of x up to `size` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


# The Triton dot (with trans_a/trans_b and f32 accumulation) moved from `pl` to the triton
# module; take it from wherever this jax has it.
def _find_dot():
    from jax.experimental import pallas as pl
    return getattr(plt, "dot", None) or pl.dot


dot = _find_dot()
