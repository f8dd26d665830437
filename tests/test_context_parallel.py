"""Context-parallel attention (llama_jax.context_parallel) equals single-device attention, on 8 fake
CPU devices: outputs and gradients against `flash_attention_reference` on the natural-order inputs.

Tiny shapes keep the file fast (every case is a compile of about 1-3 s on 2 cores): T = 32 makes 8
chunks of 4 tokens at cp=4 and 4 of 8 at cp=2; H=4 query heads over K=2 KV heads (GQA); the packed
documents' boundaries (5, 18 and 11, 14) fall inside chunks, so documents cross chunk and device
boundaries. Gradients are checked for allgather (what training runs) on every mesh and for ring on
one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llama_jax
from llama_jax import context_parallel as cp_attn
from llama_jax import sharding
from numerics import assert_close, normal, tolerances
from pallas_kernels import flash_attention_reference

B, T, H, K, E = 2, 32, 4, 2, 16
SEGMENTS = np.array([[0] * 5 + [1] * 13 + [2] * 14, [0] * 11 + [1] * 3 + [2] * 18], np.int32)  # [B, T]
MESHES = {"cp4": dict(cp=4, tp=1), "cp2_tp2": dict(cp=2, tp=2), "dp2_cp2_tp2": dict(dp=2, cp=2, tp=2)}


def inputs(t=T, seed=0):
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    return normal(kq, (B, t, H, E)), normal(kk, (B, t, K, E)), normal(kv, (B, t, K, E)), normal(kd, (B, t, H, E))


def out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(do)


@functools.cache
def reference(t, segments):
    """The single-device output and gradients on natural-order inputs (shared by the meshes)."""
    seg = SEGMENTS[:, :t] if segments else None
    fn = lambda q, k, v: flash_attention_reference(q, k, v, q_segment_ids=seg)  # noqa: E731
    return jax.jit(functools.partial(out_and_grads, fn))(*inputs(t))


def check_attention(mesh_name, method, segments, grads, impl="xla", t=T):
    """attention() on the mesh, inputs in balanced order, equals the reference in natural order."""
    q, k, v, do = inputs(t)
    seg = SEGMENTS[:, :t] if segments else None
    ref, ref_grads = reference(t, segments)
    mesh = llama_jax.make_mesh(**MESHES[mesh_name])
    cp = sharding.axis_size("seq", mesh)
    p, n = cp_attn.balanced_order(t, cp), cp_attn.natural_order(t, cp)
    seg_b = None if seg is None else jnp.asarray(seg[:, p])

    def f(q, k, v, do):
        fn = lambda q, k, v: cp_attn.attention(q, k, v, segment_ids=seg_b, impl=impl, method=method)  # noqa: E731
        return out_and_grads(fn, q, k, v, do) if grads else (fn(q, k, v), None)
    with jax.set_mesh(mesh):
        out, got_grads = jax.jit(f)(q[:, p], k[:, p], v[:, p], do[:, p])
    name = f"{mesh_name} {method} {impl} segments={segments}"
    assert_close(out[:, n], ref, **tolerances(jnp.float32, t), name=f"{name} out")
    if grads:
        for x, g, r in zip("qkv", got_grads, ref_grads):
            scale = max(1.0, float(jnp.max(jnp.abs(r))))
            assert_close(g[:, n], r, **tolerances(jnp.float32, t * t, scale), name=f"{name} d{x}")


@pytest.mark.parametrize("t, cp", [(2, 1), (24, 2), (32, 4), (64, 8)])
def test_balanced_order_layout(t, cp):
    p, n = cp_attn.balanced_order(t, cp), cp_attn.natural_order(t, cp)
    np.testing.assert_array_equal(np.sort(p), np.arange(t))
    np.testing.assert_array_equal(p[n], np.arange(t))
    np.testing.assert_array_equal(n[p], np.arange(t))
    c = t // (2 * cp)
    shards = p.reshape(cp, 2, c)  # device i's two chunks
    for i in range(cp):
        np.testing.assert_array_equal(shards[i, 0], np.arange(i * c, (i + 1) * c))
        np.testing.assert_array_equal(shards[i, 1], np.arange((2 * cp - 1 - i) * c, (2 * cp - i) * c))
    # The point of it: every device sees the same number of (query, key) pairs, causally.
    work = (shards + 1).reshape(cp, -1).sum(1)
    assert (work == work[0]).all(), work


def test_balanced_order_rejects_bad_length():
    with pytest.raises(ValueError, match=r"t=30 .*cp=4.*divisible by 8.*24 or 32"):
        cp_attn.balanced_order(30, 4)
    with pytest.raises(ValueError, match=r"t=3 .*cp=2.*4"):
        cp_attn.natural_order(3, 2)
    q, k, v, _ = inputs(t=24)  # 24 tokens over cp=4 needs 8 chunks of 3: fine; 20 is not
    with jax.set_mesh(llama_jax.make_mesh(**MESHES["cp4"])), pytest.raises(ValueError, match="t=20"):
        cp_attn.attention(q[:, :20], k[:, :20], v[:, :20])


@pytest.mark.parametrize("mesh_name, method, segments, grads", [
    ("cp4", "allgather", True, True),
    ("cp4", "allgather", False, True),
    pytest.param("cp2_tp2", "allgather", True, True, marks=pytest.mark.slow),
    pytest.param("dp2_cp2_tp2", "allgather", True, True, marks=pytest.mark.slow),
    pytest.param("cp4", "ring", True, True, marks=pytest.mark.slow),
    ("cp4", "ring", False, False),
    ("cp2_tp2", "ring", True, False),
    ("dp2_cp2_tp2", "ring", False, False),
])
def test_attention_matches_single_device(mesh_name, method, segments, grads, monkeypatch):
    if method == "ring" and grads:  # tiles of 4 x 4: several query and key blocks per ring step
        monkeypatch.setattr(cp_attn, "_RING_BLOCK_Q", 4)
        monkeypatch.setattr(cp_attn, "_RING_BLOCK_K", 4)
    check_attention(mesh_name, method, segments, grads)


@pytest.mark.slow
def test_allgather_pallas_with_grads():
    # The Pallas kernel in interpret mode, forward and backward, on a tiny shape.
    check_attention("cp2_tp2", "allgather", True, True, impl="pallas", t=16)


def test_no_mesh_or_cp1_is_plain_causal_attention():
    q, k, v, _ = inputs()
    ref = flash_attention_reference(q, k, v, q_segment_ids=SEGMENTS)
    assert_close(cp_attn.attention(q, k, v, segment_ids=SEGMENTS), ref, **tolerances(jnp.float32, T),
                 name="no mesh")
    with jax.set_mesh(llama_jax.make_mesh(dp=2, tp=2)):  # cp == 1: natural order, no gather
        out = cp_attn.attention(q, k, v, segment_ids=SEGMENTS)
    assert_close(out, ref, **tolerances(jnp.float32, T), name="cp=1")


def test_ring_refuses_pallas():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match="ring"):
        cp_attn.attention(q, k, v, impl="pallas", method="ring")


@pytest.mark.parametrize("mesh_name, impl", [("cp4", "xla"), ("cp2_tp2", "xla"), ("cp2_tp2", "pallas")])
def test_attention_cached_matches_single_device(mesh_name, impl):
    # A 16-token chunk after an 8-token prefix, in a 40-slot cache (already holding the chunk).
    # Row 0 sees the whole prefix and chunk; row 1's kv_length stops mid-chunk (its later queries
    # see only the first 13 keys); row 2's is 0: its queries see no key and must give zeros.
    b, t, s, offset = 3, 16, 40, 8
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(1), 3)
    q, k, v = normal(kq, (b, t, H, E)), normal(kk, (b, s, K, E)), normal(kv, (b, s, K, E))
    kv_length = jnp.array([offset + t, 13, 0], jnp.int32)
    ref = flash_attention_reference(q, k, v, q_offset=offset, kv_lengths=kv_length)
    with jax.set_mesh(llama_jax.make_mesh(**MESHES[mesh_name])):  # eager: outside jit works too
        out = cp_attn.attention_cached(q, k, v, q_offset=offset, kv_length=kv_length, impl=impl)
    assert_close(out, ref, **tolerances(jnp.float32, s), name=f"{mesh_name} {impl} cached")
    np.testing.assert_array_equal(np.asarray(out[2]), 0.0)
