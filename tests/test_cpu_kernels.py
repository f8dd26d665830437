"""The MKL GEMM custom call (llama_jax.cpu_kernels) against XLA's own dot: values and gradients, every
transpose, batched and shared operands, and the cases where it must stand aside."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import cpu_kernels, make_mesh
from numerics import assert_close, normal, tolerances
from pallas_kernels.flash_attention import flash_attention_reference
from test_blocked_attention import CASES as ATTENTION_CASES, check

pytestmark = pytest.mark.skipif(not cpu_kernels.enabled_for(jnp.zeros(1)), reason="MKL GEMM unavailable")


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


def test_stands_aside_for_bf16_and_under_a_mesh():
    x = jnp.zeros((4, 4))
    assert not cpu_kernels.enabled_for(x, x.astype(jnp.bfloat16))
    with jax.set_mesh(make_mesh(dp=2, tp=1)):
        assert not cpu_kernels.enabled_for(x, x)


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
    """The model's ops reach the kernels on CPU (f32, no mesh); a decode step's few rows stay XLA's."""
    from llama_jax import ops

    def text(fn, *args):
        return jax.jit(fn).lower(*args).as_text()

    w = jnp.zeros((32, 48))
    assert "llama_jax_gemm" in text(ops.linear, jnp.zeros((2, 16, 32)), w)
    assert "llama_jax_gemm" not in text(ops.linear, jnp.zeros((4, 1, 32)), w)
    assert "llama_jax_gemm" not in text(ops.linear, jnp.zeros((2, 16, 32), jnp.bfloat16), w.astype(jnp.bfloat16))
    assert "llama_jax_gemm" in text(ops.contract_rows, jnp.zeros((2, 16, 32)), jnp.zeros((2, 16, 8)))
    q, kv = jnp.zeros((1, 64, 6, 16)), jnp.zeros((1, 64, 2, 16))
    assert "llama_jax_attention" in text(ops.prefill_attention, q, kv, kv)
