"""The Mosaic GPU quantized product (pallas_kernels.mosaic.quant_matmul_mosaic) equals
quant_matmul_reference, the gradient with respect to x included, run in the Mosaic GPU interpreter on
CPU with race detection on, in a child process (tests/mosaic_interpreter.py says why); the
comparisons happen here.
"""

import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from mosaic_interpreter import outputs, run_child, save, start_case
from numerics import assert_close, tolerances

# name: (fmt, group size, x shape [..., K], N, x dtype, scale dtype, mins). The kernel's tiles are
# 128 rows of x, 128 output channels and 128 values of K, in three ring slots. The interpreter costs
# seconds per CTA and K step, so each case covers some of: more than one tile in M (ragged: padded
# rows), in N, in K; K = 512 wraps the ring; a group wider than a K tile.
CASES = {
    "int8_channel": ("int8", None, (200, 256), 128, jnp.bfloat16, jnp.float32, False),  # M, K
    "int8_g64": ("int8", 64, (2, 40, 256), 128, jnp.bfloat16, jnp.float16, False),
    "int4_g32": ("int4", 32, (200, 256), 256, jnp.bfloat16, jnp.float16, False),  # M, N, K
    "int4_g32_mins": ("int4", 32, (70, 512), 128, jnp.bfloat16, jnp.float16, True),  # the ring wraps
    "int4_g256_f16": ("int4", 256, (64, 512), 128, jnp.float16, jnp.float32, False),  # a group spans 2 tiles
    "fp8_channel": ("fp8", None, (64, 256), 128, jnp.bfloat16, jnp.float32, False),
}


def _operands(case, seed):
    """Random x, quantized bytes, scales (and mins), and the output cotangent, as numpy arrays."""
    fmt, group, x_shape, n, x_dtype, s_dtype, mins = case
    rng = np.random.default_rng(seed)
    k = x_shape[-1]
    x = rng.standard_normal(x_shape).astype(np.float32)
    if fmt == "int4":
        values = rng.integers(0, 256, (n, k // 2), dtype=np.uint8)
    elif fmt == "fp8":
        values = (rng.standard_normal((n, k)) * 64).astype(jnp.float8_e4m3fn)
    else:
        values = rng.integers(-127, 128, (n, k), dtype=np.int8)
    groups = 1 if group is None else k // group
    scales = (rng.uniform(0.5, 1.5, (n, groups)) / 64).astype(np.float32)  # |w| about 1 or less
    w_mins = (rng.standard_normal((n, groups)) / 8).astype(np.float32) if mins else None
    dy = rng.standard_normal((*x_shape[:-1], n)).astype(np.float32)
    return x, values, scales, w_mins, dy


def _run_cases(out_dir: Path) -> None:
    """The child: every case's kernel and reference outputs and x-gradients into out_dir/NAME.npz;
    a line 'CASE NAME' on stdout before each, so that a race report can be put to its case."""
    import jax

    from pallas_kernels import quant_matmul_reference
    from pallas_kernels.mosaic import interpreter, quant_matmul_mosaic

    for name, case in CASES.items():
        seed = start_case(name)
        fmt, group, _, _, x_dtype, s_dtype, _ = case
        x, values, scales, w_mins, dy = _operands(case, seed)
        x = jnp.asarray(x, x_dtype)
        scales = jnp.asarray(scales, s_dtype)
        w_mins = None if w_mins is None else jnp.asarray(w_mins, s_dtype)

        def run(fn, **extra):
            y, vjp = jax.vjp(lambda x: fn(x, values, scales, w_mins, fmt=fmt, group_size=group, **extra), x)
            (dx,) = vjp(jnp.asarray(dy))
            return y, dx

        got = run(quant_matmul_mosaic, interpret=interpreter(detect_races=True))
        want = run(quant_matmul_reference)
        save(out_dir, name, got, want)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_child(__file__, tmp_path_factory.mktemp("mosaic_quant"))


@pytest.mark.slow  # 30-40 s of the Mosaic GPU interpreter in a subprocess, all cases together
@pytest.mark.parametrize("case", list(CASES))
def test_mosaic_quant_matmul_matches_reference(case, results):
    data = outputs(results, case)
    fmt, group, x_shape, n, x_dtype, _, _ = CASES[case]
    k = x_shape[-1]
    y, dx = data["want0"], data["want1"]
    assert data["got0"].shape == (*x_shape[:-1], n)
    # The same rounding as the reference (the weight cast once to x's dtype, f32 sums): only the
    # order of the f32 sums differs. Tolerances for x's dtype over K (N for dx) terms.
    assert_close(data["got0"], y, **tolerances(x_dtype, k, max(1.0, float(np.abs(y).max()))), name=f"{case} y")
    assert_close(data["got1"], dx, **tolerances(x_dtype, n, max(1.0, float(np.abs(dx).max()))), name=f"{case} dx")


def test_bad_operands_are_refused():
    from pallas_kernels.mosaic import quant_matmul_mosaic, quant_matmul_mosaic_supports

    x = jnp.zeros((4, 256), jnp.bfloat16)
    v8, s = jnp.zeros((128, 256), jnp.int8), jnp.ones((128, 1), jnp.float32)
    with pytest.raises(ValueError, match="no kernel"):  # f32 x: wgmma takes 16-bit operands here
        quant_matmul_mosaic(x.astype(jnp.float32), v8, s, fmt="int8")
    with pytest.raises(ValueError, match="no kernel"):  # N not a multiple of 128
        quant_matmul_mosaic(x, v8[:96], s[:96], fmt="int8")
    with pytest.raises(ValueError, match="no kernel"):  # int4 groups under 16 values
        quant_matmul_mosaic(x, jnp.zeros((128, 128), jnp.uint8), jnp.ones((128, 32), jnp.float32),
                            fmt="int4", group_size=8)
    with pytest.raises(ValueError):  # the Triton kernel's operand checks: scales of the wrong shape
        quant_matmul_mosaic(x, v8, jnp.ones((128, 3), jnp.float32), fmt="int8", group_size=64)
    assert quant_matmul_mosaic_supports("int4", 32, 4096, 14336, jnp.bfloat16)
    assert quant_matmul_mosaic_supports("int8", None, 4096, 14336)
    assert quant_matmul_mosaic_supports("fp8", None, 4096)
    assert not quant_matmul_mosaic_supports("nf4", 64, 4096)
    assert not quant_matmul_mosaic_supports("int4", 32, 4096, 14336, jnp.float32)
    assert not quant_matmul_mosaic_supports("int8", None, 4000)  # K not a multiple of 128


if __name__ == "__main__":  # the child process (see the module docstring)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    _run_cases(Path(sys.argv[1]))
