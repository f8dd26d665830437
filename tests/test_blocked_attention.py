"""Blocked (memory-bounded) XLA attention equals the naive reference: outputs and gradients.

The reference is `flash_attention_reference` (the whole score tensor, -inf masks), run on the
same fresh random inputs. Small blocks (32 queries, 16 keys) against lengths they do not divide
(40, 77, 100, 131), so several query and key blocks exist, the last of each is ragged, and the
block-skipping bounds (causal frontier, offsets, kv_lengths, documents) all matter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, attention_inputs, normal, tolerances
from pallas_kernels.blocked_attention import blocked_attention, blocked_decode_attention
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.flash_attention import flash_attention_reference

BLOCKS = dict(block_q=32, block_k=16)


# (B, T, S, H, K, E, options): GQA groups 1, 3, 4; causal and not; query offsets (chunked
# prefill over a cache, T < S); ragged kv_lengths; packed documents; rows that see no key.
CASES = {
    "g3_causal_77": (2, 77, 77, 6, 2, 32, {}),
    "g1_noncausal_40x131": (2, 40, 131, 2, 2, 32, dict(causal=False)),
    "g4_chunk_offset_ragged": (2, 40, 131, 8, 2, 32, dict(
        q_offset=np.array([91, 30], np.int32), kv_lengths=np.array([131, 60], np.int32))),
    "g3_segments_100": (2, 100, 100, 6, 2, 32, dict(segments=3)),
    "g4_noncausal_ragged_segments": (2, 77, 77, 8, 2, 32, dict(
        causal=False, segments=2, kv_lengths=np.array([77, 50], np.int32))),
    # Row 0 has no key at all; in row 1 the first 10 queries sit before key 0 (offset S - T).
    "g3_empty_rows": (2, 40, 30, 6, 2, 32, dict(kv_lengths=np.array([0, 5], np.int32))),
}


def make_inputs(case, dtype=jnp.float32, seed=0):
    return attention_inputs(CASES[case], dtype, seed)


def out_and_grads(fn, q, k, v, do, opts, **kw):
    """(out, (dq, dk, dv)) of fn, jitted; the int options are traced arrays."""
    arrays = {k_: jnp.asarray(v_) for k_, v_ in opts.items() if isinstance(v_, np.ndarray)}
    static = {k_: v_ for k_, v_ in opts.items() if k_ not in arrays}

    @jax.jit
    def f(q, k, v, do, arrays):
        out, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, **static, **arrays, **kw), q, k, v)
        return out, vjp(do)
    return f(q, k, v, do, arrays)


def check(case, dtype, impl=blocked_attention, **kw):
    q, k, v, do, opts = make_inputs(case, dtype)
    out, grads = out_and_grads(impl, q, k, v, do, opts, **kw)
    ref, ref_grads = out_and_grads(flash_attention_reference, q, k, v, do, opts)
    S = k.shape[1]
    assert out.dtype == q.dtype
    assert_close(out, ref, **tolerances(dtype, S), name=f"{case} out")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.dtype == dtype
        scale = max(1.0, float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
        assert_close(g, r, **tolerances(dtype, S * q.shape[1], scale), name=f"{case} d{name}")
    return out, grads


# Two cases in `make test` (causal, and a chunk at an offset with ragged lengths); the rest slow.
@pytest.mark.parametrize("case", [c if c in ("g3_causal_77", "g4_chunk_offset_ragged") else
                                  pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_blocked_matches_reference_with_grads(case):
    out, grads = check(case, jnp.float32, **BLOCKS)
    if case == "g3_empty_rows":  # queries that see no key give exactly 0, and no NaN anywhere
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[1, :10]), 0.0)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_default_blocks_and_int_offset():
    # One query block (block_q clamps to T), the default block_k, a Python int offset.
    B, T, S, H, K, E = 1, 40, 131, 6, 2, 32
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    q, k, v = normal(kq, (B, T, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
    out = blocked_attention(q, k, v, q_offset=50)
    ref = flash_attention_reference(q, k, v, q_offset=50)
    assert_close(out, ref, **tolerances(jnp.float32, S), name="int offset")


def test_query_in_no_document_gets_zero():
    # Queries whose segment id no key carries (T < S, separate q and kv ids).
    B, T, S, H, K, E = 2, 40, 100, 6, 2, 32
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(4), 3)
    q, k, v = normal(kq, (B, T, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
    kv_seg = jnp.repeat(jnp.arange(4, dtype=jnp.int32), 25)[None].repeat(B, 0)  # (B, S)
    q_seg = kv_seg[:, S - T:].at[:, 5:12].set(99)
    kw = dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out = blocked_attention(q, k, v, **kw, **BLOCKS)
    assert_close(out, flash_attention_reference(q, k, v, **kw), **tolerances(jnp.float32, S),
                 name="unseen segment")
    np.testing.assert_array_equal(np.asarray(out[:, 5:12]), 0.0)


def test_blocks_past_the_frontier_are_never_read():
    # Key blocks every query has masked (past kv_lengths, above the causal diagonal) are
    # skipped, not computed and masked: NaN there would reach the output through 0 * NaN.
    B, T, S, H, K, E = 2, 40, 131, 6, 2, 32
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(5), 3)
    q, k, v = normal(kq, (B, T, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
    for kw, first_unread in [
        (dict(q_offset=jnp.array([50, 20], jnp.int32)), 96),  # keys >= 90 are above every query
        (dict(causal=False, kv_lengths=jnp.array([60, 44], jnp.int32)), 64),
    ]:
        nan_k, nan_v = k.at[:, first_unread:].set(jnp.nan), v.at[:, first_unread:].set(jnp.nan)
        out = blocked_attention(q, nan_k, nan_v, **kw, **BLOCKS)
        zero_k, zero_v = k.at[:, first_unread:].set(0.0), v.at[:, first_unread:].set(0.0)
        assert_close(out, flash_attention_reference(q, zero_k, zero_v, **kw),
                     **tolerances(jnp.float32, S), name=f"NaN past the frontier {kw}")


def test_bf16():
    check("g4_chunk_offset_ragged", jnp.bfloat16, **BLOCKS)


def test_scores_memory_is_bounded():
    # XLA's own count of the temporaries: the blocked program's stays near one block's scores
    # (B * H * block_q * block_k * 4 bytes = 9.4 MB) while the reference's grows as T * S.
    shapes = [jax.ShapeDtypeStruct((1, 2048, 9, 64), jnp.float32)] + 2 * [
        jax.ShapeDtypeStruct((1, 2048, 3, 64), jnp.float32)]
    temp = jax.jit(blocked_attention).lower(*shapes).compile().memory_analysis()
    naive_scores = 9 * 2048 * 2048 * 4
    assert temp.temp_size_in_bytes < naive_scores / 4, temp.temp_size_in_bytes


# ---------------------------------------------------------------------------------------------
# Decode.


def decode_inputs(B=3, H=6, K=2, S=100, E=32, dtype=jnp.float32, seed=1):
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (normal(kq, (B, H, E), dtype), normal(kk, (B, S, K, E), dtype),
            normal(kv, (B, S, K, E), dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_decode_matches_reference(dtype):
    q, k, v = decode_inputs(dtype=dtype)
    lengths = jnp.array([0, 37, 100], jnp.int32)  # empty, ragged, full; 32 divides none
    out = blocked_decode_attention(q, k, v, lengths=lengths, block_k=32)
    assert out.dtype == dtype
    assert_close(out, decode_attention_reference(q, k, v, lengths=lengths),
                 **tolerances(dtype, 100), name=f"decode {dtype.__name__}")
    np.testing.assert_array_equal(np.asarray(out[0], np.float32), 0.0)  # length 0 -> 0


def test_decode_reads_only_below_max_length():
    q, k, v = decode_inputs()
    lengths = jnp.array([10, 37, 50], jnp.int32)  # blocks of 32 from key 64 on are unread
    out = blocked_decode_attention(q, k.at[:, 64:].set(jnp.nan), v.at[:, 64:].set(jnp.nan),
                                   lengths=lengths, block_k=32)
    assert_close(out, decode_attention_reference(q, k, v, lengths=lengths),
                 **tolerances(jnp.float32, 100), name="decode NaN past max(lengths)")


def test_decode_matches_last_row_of_full_forward():
    # The cached decode step equals the last query of a causal forward over the same keys.
    B, T, S, H, K, E = 2, 40, 131, 6, 2, 32
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(6), 3)
    q, k, v = normal(kq, (B, T, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
    lengths = jnp.array([131, 77], jnp.int32)
    full = blocked_attention(q, k, v, q_offset=lengths - T, kv_lengths=lengths, **BLOCKS)
    out = blocked_decode_attention(q[:, -1], k, v, lengths=lengths, block_k=32)
    assert_close(out, full[:, -1], **tolerances(jnp.float32, S), name="decode vs full forward")
