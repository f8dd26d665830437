"""Paged decode attention (issue #23), the Triton kernel and the XLA path (blocked, for CPU), equals
its reference, and equals `decode_attention` on the same keys laid out contiguously.

The kernel runs in Pallas interpret mode on CPU. Pools are shuffled (a sequence's pages are
scattered), tables carry junk past each sequence's pages, lengths are ragged (0, 1, mid-page,
pages filled exactly), and two sequences may share their first pages (a common prompt).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from numerics import assert_close, normal, tolerances
from pallas_kernels import (DecodeBlockSizes, PagedBlockSizes, blocked_paged_decode_attention,
                            decode_attention, decode_attention_reference, paged_decode_attention,
                            paged_decode_attention_reference)


def paged_inputs(B, H, K, E, page_size, max_pages, lengths, dtype, *, shared=0, spare=3, seed=0):
    """Fresh q [B, H, E] and a shuffled pool [P, page_size, K, E] (P = the pages the lengths
    need + `spare`), a block table [B, max_pages] and lengths [B]. Each sequence owns
    ceil(length / page_size) pages at random places in the pool; the rest of its table row points
    at random pages. With shared=n, row 1 starts with row 0's first n pages (a common prefix)."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, np.int32)
    first = [shared if b == 1 else 0 for b in range(B)]  # row 1 borrows its first pages
    owned = [-(-int(n) // page_size) - f for n, f in zip(lengths, first)]
    P = sum(owned) + spare
    free = iter(rng.permutation(P))
    tables = rng.integers(0, P, (B, max_pages)).astype(np.int32)  # junk past each row's pages
    for b, (f, n) in enumerate(zip(first, owned)):
        tables[b, f:f + n] = [next(free) for _ in range(n)]
    if shared:
        tables[1, :shared] = tables[0, :shared]
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = normal(kq, (B, H, E), dtype)
    k_pages = normal(kk, (P, page_size, K, E), dtype)
    v_pages = normal(kv, (P, page_size, K, E), dtype)
    return q, k_pages, v_pages, jnp.asarray(tables), jnp.asarray(lengths)


def check(out, ref, dtype, n, name):
    err = np.abs(np.asarray(out, np.float64) - np.asarray(ref, np.float64))
    print(f"{name}: max err {err.max():.3g}, mean err {err.mean():.3g}")
    assert out.dtype == dtype
    assert_close(out, ref, **tolerances(dtype, n), name=name)


# (B, H, K, E, page_size, max_pages, lengths, block sizes): GQA groups 1, 4, 8; head dims 64 and
# 128; pages of 16 and 32. Lengths 0, 1, mid-page and exactly filled pages (48 = 3 x 16, 96 =
# the whole table); small block sizes give several steps per split and empty splits.
CASES = {
    "g1_e64_page16": (5, 4, 4, 64, 16, 6, [0, 1, 37, 48, 96], None),
    "g4_e128_page16": (4, 8, 2, 128, 16, 9, [100, 1, 144, 0], None),
    "g8_e64_page32": (4, 8, 1, 64, 32, 5, [33, 160, 0, 64], None),
    "g4_e64_page16_splits": (3, 8, 2, 64, 16, 13, [200, 17, 0], PagedBlockSizes(2, 4)),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_paged_attention_matches_reference(case, dtype):
    B, H, K, E, page_size, max_pages, lengths, bs = CASES[case]
    q, k, v, tables, lengths = paged_inputs(B, H, K, E, page_size, max_pages, lengths, dtype)
    out = paged_decode_attention(q, k, v, tables, lengths, block_sizes=bs)
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    check(out, ref, dtype, max_pages * page_size, f"{case} {jnp.dtype(dtype).name}")
    empty = np.asarray(lengths) == 0
    np.testing.assert_array_equal(np.asarray(out[empty], np.float32), 0.0)  # length 0 -> 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", ["g4_e128_page16", "g4_e64_page16_splits"])
def test_several_queries_per_sequence_are_single_queries_at_their_positions(case, dtype):
    """Speculative decoding's verify: the last T = 5 positions of each sequence at once, each query
    seeing the keys up to its own; query t equals one query alone at length lengths - T + 1 + t."""
    B, H, K, E, page_size, max_pages, _, bs = CASES[case]
    T = 5
    lengths = [100, T, 144, 37, 200, 17][:B]
    _, k, v, tables, lengths = paged_inputs(B, H, K, E, page_size, max_pages, lengths, dtype)
    q = normal(jax.random.PRNGKey(11), (B, T, H, E), dtype)
    out = paged_decode_attention(q, k, v, tables, lengths, block_sizes=bs)
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    alone = jnp.stack([paged_decode_attention_reference(q[:, t], k, v, tables, lengths - T + 1 + t)
                       for t in range(T)], axis=1)
    np.testing.assert_allclose(np.asarray(ref, np.float32), np.asarray(alone, np.float32), rtol=1e-6, atol=1e-6)
    check(out, alone, dtype, max_pages * page_size, f"{case} T={T} {jnp.dtype(dtype).name}")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_blocked_paged_attention_matches_reference(case, dtype):
    """The XLA path: a few pages gathered per loop step (block_k 32: several steps, a ragged last
    one; the default: one step), NaN wherever no sequence's keys are."""
    B, H, K, E, page_size, max_pages, lengths, _ = CASES[case]
    q, k, v, tables, lengths = paged_inputs(B, H, K, E, page_size, max_pages, lengths, dtype, seed=1)
    used = np.zeros(k.shape[:2], bool)
    for b in range(B):
        for t in range(int(lengths[b])):
            used[int(tables[b, t // page_size]), t % page_size] = True
    junk = jnp.asarray(~used)[:, :, None, None]
    k_nan, v_nan = jnp.where(junk, jnp.nan, k), jnp.where(junk, jnp.nan, v)
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    for block_k in (32, 256):
        out = blocked_paged_decode_attention(q, k_nan, v_nan, tables, lengths, block_k=block_k)
        check(out, ref, dtype, max_pages * page_size, f"{case} {jnp.dtype(dtype).name} block_k={block_k}")


def test_shared_prefix_equals_private_copies():
    # Rows 0 and 1 share their first 3 pages (48 tokens of a common prompt); row 1 then has
    # pages of its own. Sharing must give what copying the shared pages into fresh ones gives.
    q, k, v, tables, lengths = paged_inputs(2, 8, 2, 64, 16, 8, [52, 120], jnp.float32, shared=3)
    assert (tables[0, :3] == tables[1, :3]).all()
    out = paged_decode_attention(q, k, v, tables, lengths)
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    check(out, ref, jnp.float32, 128, "shared prefix")
    P = k.shape[0]
    copies = tables.at[1, :3].set(jnp.arange(P, P + 3))  # row 1 reads its own copies
    k2 = jnp.concatenate([k, k[tables[0, :3]]])
    v2 = jnp.concatenate([v, v[tables[0, :3]]])
    np.testing.assert_array_equal(out, paged_decode_attention(q, k2, v2, copies, lengths))


def test_unused_slots_never_reach_the_output():
    # What lies past a sequence's length (the rest of its last page, pages its table row does
    # not own yet, spare pages) may be anything: make it NaN.
    B, page_size = 3, 16
    q, k, v, tables, lengths = paged_inputs(B, 8, 2, 64, page_size, 6, [37, 1, 0], jnp.float32)
    used = np.zeros(k.shape[:2], bool)  # (P, page_size)
    for b in range(B):
        for t in range(int(lengths[b])):
            used[int(tables[b, t // page_size]), t % page_size] = True
    junk = jnp.asarray(~used)[:, :, None, None]
    k, v = jnp.where(junk, jnp.nan, k), jnp.where(junk, jnp.nan, v)
    out = paged_decode_attention(q, k, v, tables, lengths, block_sizes=PagedBlockSizes(2, 2))
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    check(out, ref, jnp.float32, 96, "NaN in unused slots")


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_paged_equals_contiguous_decode(dtype):
    # A contiguous cache [B, S, K, E] cut into pages, the pages shuffled in the pool: the same
    # output as `decode_attention` on the cache (bit for bit when both walk the keys in the same
    # blocks and splits), and the references agree too.
    B, S, K, E, H, page_size = 3, 256, 2, 64, 8, 16
    n = S // page_size
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(3), 3)
    q = normal(kq, (B, H, E), dtype)
    k, v = normal(kk, (B, S, K, E), dtype), normal(kv, (B, S, K, E), dtype)
    lengths = jnp.array([256, 77, 0], jnp.int32)
    perm = np.random.default_rng(3).permutation(B * n)  # pool slot of page i is perm[i]
    inverse = np.argsort(perm)

    def to_pool(x):  # (B, S, K, E) -> (B * n, page_size, K, E), shuffled
        return x.reshape(B * n, page_size, K, E)[inverse]
    tables = jnp.asarray(perm.reshape(B, n), jnp.int32)
    k_pages, v_pages = to_pool(k), to_pool(v)

    same = decode_attention(q, k, v, lengths=lengths,
                            block_sizes=DecodeBlockSizes(block_k=64, num_splits=2))
    paged = paged_decode_attention(q, k_pages, v_pages, tables, lengths,
                                   block_sizes=PagedBlockSizes(pages_per_step=4, num_splits=2))
    np.testing.assert_array_equal(np.asarray(paged, np.float32), np.asarray(same, np.float32))
    paged = paged_decode_attention(q, k_pages, v_pages, tables, lengths)  # default block sizes
    check(paged, decode_attention(q, k, v, lengths=lengths), dtype, S, "paged vs decode")
    ref = paged_decode_attention_reference(q, k_pages, v_pages, tables, lengths)
    check(ref, decode_attention_reference(q, k, v, lengths=lengths), dtype, S, "references")
