"""Tolerances and comparisons shared by the kernel tests: dtype-scaled, failures print max and mean
error, a NaN never passes."""

import math

import jax
import jax.numpy as jnp
import numpy as np

BF16_EPS = float(jnp.finfo(jnp.bfloat16).eps)  # 2**-7


def tolerances(dtype, n, scale=1.0):
    """atol/rtol for a result reduced over n terms, of magnitude about `scale`."""
    growth = max(1.0, math.sqrt(n / 64))
    if dtype == jnp.float32:
        return dict(atol=1e-5 * growth * scale, rtol=1e-5)
    return dict(atol=2 * BF16_EPS * growth * scale, rtol=2 * BF16_EPS)


def assert_close(actual, expected, *, atol, rtol, name=""):
    actual = np.asarray(jnp.asarray(actual, jnp.float32), np.float64)
    expected = np.asarray(jnp.asarray(expected, jnp.float32), np.float64)
    assert actual.shape == expected.shape, (name, actual.shape, expected.shape)
    assert np.isfinite(actual).all(), f"{name}: NaN or inf in the result"
    err = np.abs(actual - expected)
    np.testing.assert_allclose(
        actual, expected, atol=atol, rtol=rtol,
        err_msg=f"{name}: max err {err.max():.3g}, mean err {err.mean():.3g}")


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)
