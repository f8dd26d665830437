"""Every kernel, forward and backward, lowers for CUDA at the benchmark shapes, on this CPU.

`jax.export` for platforms=["cuda"] runs the Pallas -> Triton lowering without a GPU, so a
kernel that only works in interpret mode (wrong tile shapes, unsupported ops) fails here.
What it cannot catch: PTX compile errors and run-time errors on the device.
"""

import re

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import decode_attention, flash_attention, rms_norm

TRITON = "__gpu$xla.gpu.triton"
SDS = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
B, H, K, E = 2, 32, 8, 128


def lower_for_cuda(f, *args):
    """Exports jit(f) for CUDA; returns the set of custom-call targets in the module."""
    exported = jax.export.export(
        jax.jit(f), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
    return set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))


def assert_triton(f, *args):
    targets = lower_for_cuda(f, *args)
    assert TRITON in targets, targets


def loss(fn):
    """Sum of all outputs in f32, to take a gradient of."""
    def f(*args):
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in outs)
    return f


@pytest.mark.parametrize("seq", [1024, 4096, 16384])
def test_flash_attention_lowers(seq):
    q, kv = SDS((B, seq, H, E), BF16), SDS((B, seq, K, E), BF16)
    f = lambda q, k, v: flash_attention(q, k, v, causal=True, interpret=False)
    assert_triton(f, q, kv, kv)
    assert_triton(jax.grad(loss(f), argnums=(0, 1, 2)), q, kv, kv)


def test_flash_attention_all_options_lower():
    # Odd lengths, a non-power-of-two head dim, offsets, ragged lengths and segments.
    q, kv, ids = SDS((2, 100, 12, 80), BF16), SDS((2, 130, 4, 80), BF16), SDS((2,), jnp.int32)
    q_seg, kv_seg = SDS((2, 100), jnp.int32), SDS((2, 130), jnp.int32)
    f = lambda q, k, v, off, lens, qs, ks: flash_attention(
        q, k, v, q_offset=off, kv_lengths=lens, q_segment_ids=qs, kv_segment_ids=ks,
        interpret=False)
    assert_triton(jax.grad(loss(f), argnums=(0, 1, 2)), q, kv, kv, ids, ids, q_seg, kv_seg)


@pytest.mark.parametrize("context", [8192, 131072, 1000])
def test_decode_attention_lowers(context):
    q, cache, lengths = SDS((8, H, E), BF16), SDS((8, context, K, E), BF16), SDS((8,), jnp.int32)
    f = lambda q, k, v, n: decode_attention(q, k, v, lengths=n, interpret=False)
    assert_triton(f, q, cache, cache, lengths)


@pytest.mark.parametrize("shape", [(8192, 4096), (5, 576)])
def test_rms_norm_lowers(shape):
    x, w = SDS(shape, BF16), SDS(shape[-1:], BF16)
    f = lambda x, w: rms_norm(x, w, interpret=False)
    f_res = lambda x, w, r: rms_norm(x, w, r, interpret=False)
    assert_triton(f, x, w)
    assert_triton(f_res, x, w, x)
    assert_triton(jax.grad(loss(f), argnums=(0, 1)), x, w)
    assert_triton(jax.grad(loss(f_res), argnums=(0, 1, 2)), x, w, x)
