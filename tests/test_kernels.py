"""Kernels equal their references (outputs and gradients), and references equal naive math.

The kernels run in Pallas interpret mode on CPU. The references are also the model's XLA
fallback, so they are checked separately against deliberately naive float64 NumPy versions
(explicit K/V repeat, dense mask, per-row softmax).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, attention_inputs, normal, tolerances
from pallas_kernels.flash_attention import _TABLE as _FLASH_TABLE
from pallas_kernels import (DecodeBlockSizes, FlashBlockSizes, decode_attention,
                            decode_attention_reference, flash_attention,
                            flash_attention_reference, rms_norm, rms_norm_reference)


# ---------------------------------------------------------------------------------------------
# Naive references: float64 NumPy, explicit repeat of K/V to H heads, dense masks.


def naive_attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, q_seg=None,
                    kv_seg=None, sm_scale=None):
    q, k, v = (np.asarray(jnp.asarray(a, jnp.float32), np.float64) for a in (q, k, v))
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    k = np.repeat(k, H // K, axis=2)  # (B, S, H, E): query head h uses kv head h // G
    v = np.repeat(v, H // K, axis=2)
    sm_scale = 1 / math.sqrt(E) if sm_scale is None else sm_scale
    q_offset = np.broadcast_to(S - T if q_offset is None else np.asarray(q_offset), (B,))
    kv_lengths = np.broadcast_to(S if kv_lengths is None else np.asarray(kv_lengths), (B,))
    out = np.zeros((B, T, H, E))
    for b in range(B):
        i, j = np.arange(T)[:, None], np.arange(S)[None, :]
        mask = j < kv_lengths[b]
        if causal:
            mask = mask & (j <= q_offset[b] + i)
        if q_seg is not None:
            mask = mask & (np.asarray(q_seg)[b][:, None] == np.asarray(kv_seg)[b][None, :])
        mask = np.broadcast_to(mask, (T, S))
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h].T * sm_scale  # (T, S)
            for t in range(T):
                if mask[t].any():
                    w = np.exp(s[t, mask[t]] - s[t, mask[t]].max())
                    out[b, t, h] = (w / w.sum()) @ v[b, mask[t], h]
    return out


def naive_rms_norm(x, weight, eps=1e-5):
    x = np.asarray(jnp.asarray(x, jnp.float32), np.float64)
    w = np.asarray(jnp.asarray(weight, jnp.float32), np.float64)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


# ---------------------------------------------------------------------------------------------
# Flash attention.

# (B, T, S, H, K, E, options): GQA groups 1, 2, 4, 8; odd lengths; offsets; ragged; segments.
FLASH_CASES = {
    "g1_causal_17": (2, 17, 17, 2, 2, 64, {}),
    "g2_noncausal_17x100": (2, 17, 100, 4, 2, 64, dict(causal=False)),
    "g4_offset_ragged_257": (2, 33, 257, 4, 1, 128, dict(
        q_offset=np.array([224, 100], np.int32), kv_lengths=np.array([257, 120], np.int32))),
    "g8_segments_100": (2, 100, 100, 8, 1, 64, dict(segments=3)),
    "g2_int_offset_t_lt_s": (1, 17, 100, 4, 2, 64, dict(q_offset=40)),
    "g4_one_query": (3, 1, 100, 8, 2, 64, {}),
    "g2_empty_rows": (2, 40, 30, 4, 2, 64, dict(kv_lengths=np.array([0, 5], np.int32))),
    "table_e64": (1, 200, 200, 4, 2, 64, dict(kv_lengths=np.array([190], np.int32))),
    "table_e128": (1, 200, 200, 4, 1, 128, dict(segments=2)),
    "g2_noncausal_ragged_segments": (2, 17, 33, 4, 2, 64, dict(
        causal=False, segments=2, kv_lengths=np.array([33, 20], np.int32))),
}
SMALL_BLOCKS = FlashBlockSizes(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32,
                               block_q_dkv=32, block_k_dkv=16)


def flash_inputs(case, dtype, seed=0):
    return attention_inputs(FLASH_CASES[case], dtype, seed)


_JIT_CACHE = {}


def flash_vjp(fn, opts, block_sizes=None):
    """jit(out, grads) of fn; cached per case so compilation is paid once."""
    key = (fn, tuple(sorted((k, str(v)) for k, v in opts.items())), block_sizes)
    if key not in _JIT_CACHE:
        kw = dict(block_sizes=block_sizes) if block_sizes else {}
        arrays = {k: v for k, v in opts.items() if isinstance(v, np.ndarray)}
        static = {k: v for k, v in opts.items() if k not in arrays}

        def f(q, k, v, do, arrays):
            out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **static, **arrays, **kw), q, k, v)
            return out, vjp(do)
        _JIT_CACHE[key] = jax.jit(f)
    arrays = {k: jnp.asarray(v) for k, v in opts.items() if isinstance(v, np.ndarray)}
    return lambda q, k, v, do: _JIT_CACHE[key](q, k, v, do, arrays)


def check_flash(case, dtype, block_sizes=None, grad=True):
    q, k, v, do, opts = flash_inputs(case, dtype)
    if grad:
        out, grads = flash_vjp(flash_attention, opts, block_sizes)(q, k, v, do)
        ref, ref_grads = flash_vjp(flash_attention_reference, opts)(q, k, v, do)
    else:
        kw = {k_: jnp.asarray(v_) if isinstance(v_, np.ndarray) else v_ for k_, v_ in opts.items()}
        out = flash_attention(q, k, v, block_sizes=block_sizes, **kw)
        ref = jax.jit(lambda *a: flash_attention_reference(*a, **kw))(q, k, v)
    S = k.shape[1]
    assert out.dtype == q.dtype
    assert_close(out, ref, **tolerances(dtype, S), name=f"{case} out")
    if case == "g2_empty_rows":  # queries that see no key give exactly 0
        np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)  # no keys at all
        np.testing.assert_array_equal(np.asarray(out[1, :10], np.float32), 0.0)  # causal
    if not grad:
        return
    for name, g, r in zip("qkv", grads, ref_grads):
        scale = max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
        assert_close(g, r, **tolerances(dtype, S * q.shape[1], scale), name=f"{case} d{name}")


# Tiles smaller than the sequences, different per kernel, so that several query and key
# blocks exist and the block-skipping bounds (causal frontier, offsets, kv_lengths) matter.
FLASH_F32 = {
    "g1_causal_17": None,
    "g2_noncausal_17x100": None,
    "g4_offset_ragged_257": SMALL_BLOCKS,
    "g8_segments_100": SMALL_BLOCKS,
    "g2_empty_rows": SMALL_BLOCKS,
    "g2_noncausal_ragged_segments": SMALL_BLOCKS,
}


@pytest.mark.parametrize("case", list(FLASH_F32))
def test_flash_attention_f32(case):
    check_flash(case, jnp.float32, FLASH_F32[case])


@pytest.mark.parametrize("key", list(_FLASH_TABLE), ids=lambda k: f"e{128 if k[0] else 64}_{'short' if k[1] else 'long'}")
def test_flash_attention_block_size_table(key):
    """Every entry of the kernel's block-size table, forward and backward, on sequences longer
    than its tiles."""
    check_flash("table_e128" if key[0] else "table_e64", jnp.float32, _FLASH_TABLE[key])


@pytest.mark.parametrize("case", ["g2_int_offset_t_lt_s", "g4_one_query"])
def test_flash_attention_forward_f32(case):
    check_flash(case, jnp.float32, grad=False)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["g1_causal_17", "g4_offset_ragged_257"])
def test_flash_attention_bf16(case):
    check_flash(case, jnp.bfloat16)


@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attention_reference_matches_naive(case):
    q, k, v, _, opts = flash_inputs(case, jnp.float32)
    want = naive_attention(q, k, v, causal=opts.get("causal", True),
                           q_offset=opts.get("q_offset"), kv_lengths=opts.get("kv_lengths"),
                           q_seg=opts.get("q_segment_ids"), kv_seg=opts.get("kv_segment_ids"))
    got = flash_attention_reference(q, k, v, **{k_: jnp.asarray(v_) if isinstance(v_, np.ndarray)
                                                 else v_ for k_, v_ in opts.items()})
    assert_close(got, want, **tolerances(jnp.float32, k.shape[1]), name=case)


def test_flash_attention_reference_bf16_matches_naive():
    q, k, v, _, opts = flash_inputs("g4_offset_ragged_257", jnp.bfloat16)
    want = naive_attention(q, k, v, q_offset=opts["q_offset"], kv_lengths=opts["kv_lengths"])
    got = flash_attention_reference(q, k, v, q_offset=jnp.asarray(opts["q_offset"]),
                                    kv_lengths=jnp.asarray(opts["kv_lengths"]))
    assert_close(got, want, **tolerances(jnp.bfloat16, k.shape[1]), name="bf16 reference")


def test_flash_attention_reference_grad_is_finite():
    # Masked logits are -inf in the reference: its gradient must still be NaN-free.
    q, k, v, do, opts = flash_inputs("g2_empty_rows", jnp.float32)
    grads = flash_vjp(flash_attention_reference, opts)(q, k, v, do)[1]
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# ---------------------------------------------------------------------------------------------
# Decode attention.

# (B, H, K, S, E, dtype, block_sizes): GQA 1, 2, 4, 8; cache lengths 1, 17, 100, 257.
DECODE_CASES = {
    "g1_s1": (2, 2, 2, 1, 64, jnp.float32, None),
    "g2_s17": (3, 4, 2, 17, 64, jnp.float32, None),
    "g4_s100_splits": (3, 8, 2, 100, 128, jnp.float32, DecodeBlockSizes(block_k=16, num_splits=3)),
    "g8_s257": (2, 8, 1, 257, 64, jnp.float32, DecodeBlockSizes(block_k=32, num_splits=4)),
    "g4_s100_bf16": (2, 8, 2, 100, 128, jnp.bfloat16, DecodeBlockSizes(block_k=32, num_splits=2)),
}


def decode_inputs(case, seed=1):
    B, H, K, S, E, dtype, bs = DECODE_CASES[case]
    kq, kk, kv, kl = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v = normal(kq, (B, H, E), dtype), normal(kk, (B, S, K, E), dtype), normal(
        kv, (B, S, K, E), dtype)
    # Random lengths, with an empty sequence and a full one.
    lengths = jax.random.randint(kl, (B,), 1, S + 1).at[0].set(0).at[-1].set(S)
    return q, k, v, lengths.astype(jnp.int32), dtype, bs


def naive_decode(q, k, v, lengths):
    out = naive_attention(q[:, None], k, v, causal=False, kv_lengths=lengths)
    return out[:, 0]


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_attention(case):
    q, k, v, lengths, dtype, bs = decode_inputs(case)
    out = decode_attention(q, k, v, lengths=lengths, block_sizes=bs)
    ref = decode_attention_reference(q, k, v, lengths=lengths)
    assert out.dtype == q.dtype
    assert_close(out, ref, **tolerances(dtype, k.shape[1]), name=case)
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)  # length 0 -> 0


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_attention_reference_matches_naive(case):
    q, k, v, lengths, dtype, _ = decode_inputs(case)
    got = decode_attention_reference(q, k, v, lengths=lengths)
    assert_close(got, naive_decode(q, k, v, np.asarray(lengths)),
                 **tolerances(dtype, k.shape[1]), name=case)


def test_decode_matches_flash_last_query():
    # The cached decode step equals the last row of a causal full attention.
    q, k, v, _, _ = flash_inputs("g4_offset_ragged_257", jnp.float32)
    lengths = jnp.array([257, 120], jnp.int32)
    full = flash_attention_reference(q, k, v, q_offset=lengths - q.shape[1], kv_lengths=lengths)
    out = decode_attention(q[:, -1], k, v, lengths=lengths)
    assert_close(out, full[:, -1], **tolerances(jnp.float32, 257), name="decode vs flash")


# ---------------------------------------------------------------------------------------------
# RMSNorm.

RMS_CASES = {  # shape, x dtype, weight dtype
    "f32_576": ((3, 5, 576), jnp.float32, jnp.float32),
    "bf16_100": ((7, 100), jnp.bfloat16, jnp.bfloat16),
    "bf16_x_f32_w_64": ((4, 64), jnp.bfloat16, jnp.float32),
}


def rms_inputs(case, seed=2):
    shape, dtype, wdtype = RMS_CASES[case]
    kx, kr, kw, kg, kh = jax.random.split(jax.random.PRNGKey(seed), 5)
    x, r = normal(kx, shape, dtype), normal(kr, shape, dtype)
    w = (1 + 0.1 * jax.random.normal(kw, shape[-1:])).astype(wdtype)
    return x, r, w, normal(kg, shape, dtype), normal(kh, shape, dtype)


def rms_tolerances(dtype, d):
    # Outputs are rounded to x.dtype: allow one ulp of it, on values of magnitude ~4.
    return dict(atol=1e-5, rtol=1e-5) if dtype == jnp.float32 else tolerances(dtype, d, 4.0)


@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm(case):
    x, r, w, dy, dh = rms_inputs(case)
    tol = rms_tolerances(x.dtype, x.shape[-1])
    y, vjp = jax.vjp(rms_norm, x, w)
    y_ref, vjp_ref = jax.vjp(rms_norm_reference, x, w)
    assert y.dtype == x.dtype
    assert_close(y, y_ref, **tol, name=f"{case} y")
    for name, g, g_ref in zip(["dx", "dweight"], vjp(dy), vjp_ref(dy)):
        n = x.size // x.shape[-1] if name == "dweight" else x.shape[-1]
        assert_close(g, g_ref, **tolerances(x.dtype, n, 4.0), name=f"{case} {name}")


@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm_residual(case):
    x, r, w, dy, dh = rms_inputs(case)
    tol = rms_tolerances(x.dtype, x.shape[-1])
    (y, h), vjp = jax.vjp(rms_norm, x, w, r)
    (y_ref, h_ref), vjp_ref = jax.vjp(rms_norm_reference, x, w, r)
    assert_close(h, h_ref, atol=0, rtol=0, name=f"{case} h")  # same f32 add, same rounding
    assert_close(y, y_ref, **tol, name=f"{case} y")
    for name, g, g_ref in zip(["dx", "dweight", "dresidual"], vjp((dy, dh)), vjp_ref((dy, dh))):
        n = x.size // x.shape[-1] if name == "dweight" else x.shape[-1]
        assert_close(g, g_ref, **tolerances(x.dtype, n, 4.0), name=f"{case} {name}")


@pytest.mark.parametrize("case", list(RMS_CASES))
def test_rms_norm_reference_matches_naive(case):
    x, r, w, _, _ = rms_inputs(case)
    tol = rms_tolerances(x.dtype, x.shape[-1])
    assert_close(rms_norm_reference(x, w), naive_rms_norm(x, w), **tol, name=case)
    h = np.asarray(x, np.float64) + np.asarray(r, np.float64)
    y, h_got = rms_norm_reference(x, w, r)
    assert_close(h_got, h, **tol, name=f"{case} h")
    assert_close(y, naive_rms_norm(h_got, w), **tol, name=f"{case} y(h)")


def test_rms_norm_matches_hugging_face_formula_exactly():
    # bf16 in, bf16 weight: normalize in f32, cast to bf16, then scale (LlamaRMSNorm).
    x, _, w, _, _ = rms_inputs("bf16_100")
    h32 = x.astype(jnp.float32)
    want = (h32 * jax.lax.rsqrt(jnp.mean(h32 ** 2, -1, keepdims=True) + 1e-5)).astype(x.dtype) * w
    np.testing.assert_array_equal(np.asarray(rms_norm(x, w), np.float32),
                                  np.asarray(want, np.float32))
