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


def attention_inputs(case, dtype, seed=0):
    """Fresh q [B, T, H, E], k, v [B, S, K, E], an output cotangent, and the options of a case
    (B, T, S, H, K, E, options); options["segments"] = n becomes sorted segment ids (contiguous
    packed documents) for queries and keys."""
    B, T, S, H, K, E, opts = case
    kq, kk, kv, ks, kd = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = normal(kq, (B, T, H, E), dtype), normal(kk, (B, S, K, E), dtype), normal(
        kv, (B, S, K, E), dtype)
    opts = dict(opts)
    if n := opts.pop("segments", 0):
        ids = np.sort(np.asarray(jax.random.randint(ks, (B, S), 0, n)), axis=1).astype(np.int32)
        opts["q_segment_ids"], opts["kv_segment_ids"] = ids[:, S - T:], ids
    return q, k, v, normal(kd, (B, T, H, E), dtype), opts
