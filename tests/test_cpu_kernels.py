"""The optional C++ CPU backend (the cpu_kernels package) against XLA's own dot and the attention references:
the MKL GEMM (values and gradients, every transpose, batched and shared operands), the decode
matrix-vector product, prefill attention with its gradients, decode attention, and the cases where
they must stand aside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from llama_jax import make_mesh, ops
from numerics import assert_close, normal, tolerances
from pallas_kernels.decode_attention import decode_attention_reference
from pallas_kernels.paged_attention import paged_decode_attention_reference
from pallas_kernels.flash_attention import flash_attention_reference
from test_blocked_attention import CASES as ATTENTION_CASES, check

# `make test` installs the backend (the cpu extra); elsewhere the reason it cannot load is the skip's.
pytestmark = pytest.mark.skipif(cpu_kernels.load() is not None, reason=f"cpu_kernels: {cpu_kernels.load()}")


def _op(x, t):
    return jnp.swapaxes(x, -1, -2) if t else x


GEMM_CASES = [  # (a shape, b shape) before the transposes are applied
    ((37, 53), (53, 29)),
    ((3, 37, 53), (3, 53, 29)),  # batched
    ((2, 3, 37, 53), (53, 29)),  # b shared by the batch
    ((37, 53), (4, 53, 29)),  # a shared by the batch
    ((1, 53), (53, 200)),  # a matrix-vector product
]


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("shapes", GEMM_CASES, ids=lambda s: "x".join(map(str, s)))
def test_gemm_equals_xla(shapes, trans_a, trans_b):
    ka, kb, kg = jax.random.split(jax.random.key(hash((shapes, trans_a, trans_b)) % 2**31), 3)
    a, b = normal(ka, shapes[0]), normal(kb, shapes[1])
    a, b = _op(a, trans_a), _op(b, trans_b)  # stored transposed; op() undoes it

    def ours(a, b):
        return cpu_kernels.gemm(a, b, trans_a, trans_b)

    def xla(a, b):
        return jnp.matmul(_op(a, trans_a), _op(b, trans_b), precision="highest")

    out = jax.jit(ours)(a, b)
    assert_close(out, xla(a, b), atol=1e-4, rtol=1e-5, name="value")
    g = normal(kg, out.shape)
    grads = jax.jit(jax.grad(lambda a, b: jnp.sum(ours(a, b) * g), argnums=(0, 1)))(a, b)
    want = jax.grad(lambda a, b: jnp.sum(xla(a, b) * g), argnums=(0, 1))(a, b)
    for name, x, y in zip(("da", "db"), grads, want):
        assert x.shape == y.shape, name
        assert_close(x, y, atol=1e-3, rtol=1e-5, name=name)


def test_empty_contraction_is_zero():
    out = jax.jit(cpu_kernels.gemm)(jnp.ones((4, 0)), jnp.ones((0, 3)))
    np.testing.assert_array_equal(out, np.zeros((4, 3), np.float32))


# (rows, in, out): one row and a few, widths that do and do not fill the kernel's 8-row blocks and
# AVX lanes, one small enough to run on one thread and one split over the pool.
MATVEC_CASES = [(1, 576, 1536), (3, 53, 29), (1, 1000, 300), (15, 40, 2051), (2, 7, 5)]


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("shape", MATVEC_CASES, ids=lambda s: "x".join(map(str, s)))
def test_matvec_equals_xla(shape, transposed):
    m, k, n = shape
    kx, kw, kg = jax.random.split(jax.random.key(hash((shape, transposed)) % 2**31), 3)
    x, w = normal(kx, (m, k)), normal(kw, (n, k) if transposed else (k, n))

    def xla(x, w):
        return jnp.matmul(x, _op(w, transposed), precision="highest")

    out = jax.jit(cpu_kernels.matvec, static_argnums=2)(x, w, transposed)
    assert_close(out, xla(x, w), atol=1e-4, rtol=1e-5, name="value")
    g = normal(kg, out.shape)
    grads = jax.grad(lambda x, w: jnp.sum(cpu_kernels.matvec(x, w, transposed) * g), argnums=(0, 1))(x, w)
    want = jax.grad(lambda x, w: jnp.sum(xla(x, w) * g), argnums=(0, 1))(x, w)
    for name, a, b in zip(("dx", "dw"), grads, want):
        assert_close(a, b, atol=1e-3, rtol=1e-5, name=name)


@pytest.mark.parametrize("rows", [2, 4, 5])
def test_matvec_rows_together_equal_rows_alone(rows):
    """Each row's result is bit for bit the one it gets alone: a speculative verify's few rows give
    the tokens a decode step gives, and a request's tokens do not depend on its batch."""
    kx, kw = jax.random.split(jax.random.key(rows))
    x, w = normal(kx, (rows, 203)), normal(kw, (1030, 203))
    product = jax.jit(cpu_kernels.matvec, static_argnums=2)
    together = np.asarray(product(x, w, True))
    alone = np.concatenate([np.asarray(product(x[i:i + 1], w, True)) for i in range(rows)])
    np.testing.assert_array_equal(together, alone)
    assert_close(together, jnp.matmul(x, w.T, precision="highest"), atol=1e-4, rtol=1e-5, name="value")


def test_matvec_from_two_threads_at_once():
    # XLA runs independent products concurrently (q, k and v): one takes the pool, the other runs
    # on its own thread; both must come out right.
    ks = jax.random.split(jax.random.key(3), 4)
    x = normal(ks[0], (1, 576))
    ws = [normal(kk, (1536, 576)) for kk in ks[1:]]
    outs = jax.jit(lambda x, *ws: [cpu_kernels.matvec(x, w, True) for w in ws])(x, *ws)
    for out, w in zip(outs, ws):
        assert_close(out, jnp.matmul(x, w.T, precision="highest"), atol=1e-4, rtol=1e-5, name="value")


# (B, S, H, K, lengths): a short cache (one chunk), a ragged batch over several chunks with a row
# of one key and one that ends inside a tile, a row with no keys (zeros), and MHA.
DECODE_CASES = [(1, 80, 9, 3, [37]), (3, 1000, 8, 2, [1, 513, 1000]), (2, 300, 4, 4, [0, 257])]


@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}S{c[1]}H{c[2]}K{c[3]}")
def test_decode_attention_matches_reference(case):
    B, S, H, K, lengths = case
    E = 64
    kq, kk, kv = jax.random.split(jax.random.key(S), 3)
    q, k, v = normal(kq, (B, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
    lengths = jnp.asarray(lengths, jnp.int32)
    out = jax.jit(lambda q, k, v, n: cpu_kernels.decode_attention(q, k, v, lengths=n))(q, k, v, lengths)
    assert_close(out, decode_attention_reference(q, k, v, lengths=lengths), **tolerances(jnp.float32, S), name="out")
    empty = np.asarray(lengths) == 0
    np.testing.assert_array_equal(np.asarray(out)[empty], 0.0)


def test_paged_decode_attention_matches_reference():
    """The same kernel through a block table: pages of 16 scattered in a shuffled pool, ragged
    lengths (none, one key, mid-page, several chunks), the tables' spare entries at the null page."""
    B, H, K, E, page, width = 4, 9, 3, 64, 16, 40
    lengths = np.array([0, 1, 37, 600], np.int32)
    owned = -(-lengths // page)
    P = int(owned.sum()) + 1
    order = iter(np.random.default_rng(0).permutation(np.arange(1, P)))
    tables = np.zeros((B, width), np.int32)
    for b in range(B):
        tables[b, :owned[b]] = [next(order) for _ in range(owned[b])]
    kq, kk, kv = jax.random.split(jax.random.key(1), 3)
    q, k, v = normal(kq, (B, H, E)), normal(kk, (P, page, K, E)), normal(kv, (P, page, K, E))
    out = jax.jit(lambda *a: cpu_kernels.paged_decode_attention(*a))(q, k, v, tables, lengths)
    ref = paged_decode_attention_reference(q, k, v, tables, lengths)
    assert_close(out, ref, **tolerances(jnp.float32, width * page), name="out")
    np.testing.assert_array_equal(np.asarray(out)[0], 0.0)


def test_stands_aside_for_bf16_under_a_mesh_and_when_off():
    x = jnp.zeros((32, 4))

    def calls_gemm(x, w, on=True):
        return "llama_jax_gemm" in jax.jit(lambda x, w: ops.linear(x, w, cpu_kernels=on)).lower(x, w).as_text()

    assert calls_gemm(x, x.T)
    assert not calls_gemm(x, x.T, on=False)
    assert not calls_gemm(x, x.T.astype(jnp.bfloat16))
    with jax.set_mesh(make_mesh(dp=2, tp=1)):
        assert not calls_gemm(x, x.T)


# The CPU attention kernel against the naive reference, on test_blocked_attention's cases (every
# mask: causal or not, query offsets, ragged lengths, documents, rows that see no key), with small
# blocks so that several query and key blocks exist and the last of each is ragged. The gradients
# are the blocked backward's, from the kernel's log-sum-exp.
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_matches_reference_with_grads(case):
    out, grads = check(case, jnp.float32, impl=cpu_kernels.attention, block_q=8, block_k=16)
    if case == "g3_empty_rows":
        np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
        np.testing.assert_array_equal(np.asarray(out[1, :10]), 0.0)


def test_attention_default_blocks_long_causal():
    # The model's shape class: one sequence, G = 3, several default-size blocks, a chunk at an offset.
    B, T, S, H, K, E = 1, 700, 1100, 9, 3, 64
    kq, kk, kv = jax.random.split(jax.random.key(7), 3)
    q, k, v = normal(kq, (B, T, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
    kw = dict(q_offset=jnp.array([300], jnp.int32), kv_lengths=jnp.array([1000], jnp.int32))
    out = jax.jit(lambda q, k, v: cpu_kernels.attention(q, k, v, **kw))(q, k, v)
    ref = flash_attention_reference(q, k, v, causal=True, **kw)
    assert_close(out, ref, **tolerances(jnp.float32, S), name="out")


def test_ops_dispatch_to_the_kernels():
    """The model's ops reach the kernels on CPU (f32, no mesh) when the runtime enables them: GEMMs
    for many rows, the matrix-vector kernel for a decode step's few, and each attention kernel."""
    import functools

    def text(fn, *args):
        return jax.jit(functools.partial(fn, cpu_kernels=True)).lower(*args).as_text()

    w = jnp.zeros((32, 48))
    assert "llama_jax_gemm" in text(ops.linear, jnp.zeros((2, 16, 32)), w)
    decode = text(ops.linear, jnp.zeros((4, 1, 32)), w)
    assert "llama_jax_matvec" in decode and "llama_jax_gemm" not in decode
    assert "llama_jax_gemm" not in text(ops.linear, jnp.zeros((2, 16, 32), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert "llama_jax_gemm" in text(ops.contract_rows, jnp.zeros((2, 16, 32)), jnp.zeros((2, 16, 8)))
    q, kv = jnp.zeros((1, 64, 6, 16)), jnp.zeros((1, 64, 2, 16))
    assert "llama_jax_attention" in text(ops.prefill_attention, q, kv, kv)
    lengths = jnp.ones((1,), jnp.int32)
    assert "llama_jax_decode_attention" in text(functools.partial(ops.decode_attention, lengths=lengths),
                                                q[:, 0], kv, kv)
