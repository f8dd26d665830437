"""The quantized matmul kernel (pallas_kernels.quant_matmul) equals llama_jax.quant.qlinear, the XLA
product, on fresh random weights: every format, odd row counts, ragged N and K, K split across
programs, the prefill tiles, and GGUF's own blocks; its x-gradient equals autodiff through qlinear.
The kernel runs in Pallas interpret mode here; the last tests lower it (and its gradient) for CUDA
(Triton), which interpret mode does not check.

Kernel and reference round the same operands (x's dtype, the weight dequantized in f32 and cast to
it), so they differ only in the order of f32 sums: f32 tolerances hold for bf16 inputs too."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import quant
from numerics import assert_close, tolerances
from pallas_kernels import QuantBlockSizes, quant_matmul, quant_matmul_reference, quant_matmul_supports

# (format, quantize options): per output channel and GGUF's blocks (Q8_0, Q4_0, Q4_1).
FORMATS = {"int8": ("int8", dict(group_size=None)), "int8_g32": ("int8", dict(group_size=32)),
           "int4": ("int4", {}), "int4_mins": ("int4", dict(asymmetric=True)), "fp8": ("fp8", {})}
# (M, N, K, x dtype, block sizes): odd rows, N not a multiple of the tile, K with a ragged last tile
# and split across programs (3 splits of uneven length), and the default tiles with their splits.
SMALL = QuantBlockSizes(block_n=16, block_k=64, k_splits=3)
SHAPES = {"m1_ragged_split": (1, 70, 1120, jnp.float32, SMALL),
          "m5_bf16_ragged_split": (5, 33, 608, jnp.bfloat16, SMALL),
          "m16_default_tiles": (16, 64, 2048, jnp.bfloat16, None)}


def _case(fmt_id, seed, n, k):
    fmt, kw = FORMATS[fmt_id]
    rng = np.random.default_rng(seed)
    # Per-channel spread, as trained weights have, so per-channel and per-group scales differ.
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.02, 2.0, (n, 1)).astype(np.float32)
    return quant.quantize(w, fmt, axis=-1, **kw), rng


def _run(x, q, block_sizes=None):
    return quant_matmul(x, q.values, q.scales, q.mins, fmt=q.format, group_size=q.group_size,
                        block_sizes=block_sizes, interpret=True)


def _check(y, x, q, name):
    ref = quant.qlinear(x, q)
    assert y.dtype == jnp.float32 and y.shape == ref.shape, (y.dtype, y.shape, ref.shape)
    scale = float(jnp.max(jnp.abs(ref)))
    assert_close(y, ref, **tolerances(jnp.float32, x.shape[-1], scale=scale), name=name)
    mine = quant_matmul_reference(x, q.values, q.scales, q.mins, fmt=q.format, group_size=q.group_size)
    assert_close(mine, ref, **tolerances(jnp.float32, x.shape[-1], scale=scale), name=f"{name} (reference)")


@pytest.mark.parametrize("shape_id", SHAPES)
@pytest.mark.parametrize("fmt_id", FORMATS)
def test_decode_product_equals_qlinear(fmt_id, shape_id):
    m, n, k, dtype, bs = SHAPES[shape_id]
    q, rng = _case(fmt_id, list(FORMATS).index(fmt_id), n, k)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    if bs is None:  # the defaults split K at this shape: the split path is what decode runs
        assert QuantBlockSizes.get_default(m, n, k).k_splits > 1
    _check(_run(x, q, bs), x, q, f"{fmt_id} {shape_id}")


@pytest.mark.parametrize("fmt_id", ["int8", "int4_mins", "fp8"])
def test_prefill_tiles_equal_qlinear(fmt_id):
    # More rows than the decode tiles take: the default prefill tiles (block_m 64), x with batch axes.
    q, rng = _case(fmt_id, 7, 150, 640)
    x = jnp.asarray(rng.standard_normal((2, 19, 640)), jnp.bfloat16)  # (B, T, K): 38 rows
    bs = QuantBlockSizes.get_default(38, 150, 640)
    assert bs.block_m > 16 and bs.k_splits == 1
    _check(_run(x, q), x, q, f"{fmt_id} prefill")


@pytest.mark.parametrize("fmt_id,dtype", [("int8", jnp.float32), ("int8_g32", jnp.bfloat16),
                                           ("int4_mins", jnp.bfloat16), ("fp8", jnp.float32)])
def test_x_gradient_equals_qlinear_gradient(fmt_id, dtype):
    # QLoRA's frozen base: the gradient flows to x only; the reference is autodiff through qlinear.
    q, rng = _case(fmt_id, 11, 40, 320)
    x = jnp.asarray(rng.standard_normal((2, 3, 320)), dtype)
    ct = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    dx = jax.grad(lambda x: jnp.sum(_run(x, q, SMALL) * ct))(x)
    ref = jax.grad(lambda x: jnp.sum(quant.qlinear(x, q) * ct))(x)
    assert dx.dtype == x.dtype and dx.shape == x.shape, (dx.dtype, dx.shape)
    assert_close(dx, ref, **tolerances(dtype, 40, scale=float(jnp.max(jnp.abs(ref)))), name=f"{fmt_id} dx")


def test_the_weight_is_frozen():
    q, rng = _case("int4_mins", 12, 32, 128)
    x = jnp.asarray(rng.standard_normal((1, 128)), jnp.float32)
    ds, dm = jax.grad(lambda s, m: jnp.sum(quant_matmul(x, q.values, s, m, fmt="int4", group_size=32,
                                                        interpret=True)), argnums=(0, 1))(q.scales, q.mins)
    assert not jnp.any(ds) and not jnp.any(dm)


@pytest.mark.parametrize("type_name", sorted(quant.GGUF_BLOCKS))
def test_gguf_blocks_feed_the_kernel_as_they_are(type_name):
    # Random GGUF blocks (f16 scale [and min], then the payload) kept byte for byte by from_gguf.
    n, k = 48, 256
    nbytes, fmt, has_min = quant.GGUF_BLOCKS[type_name]
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (n, k // 32, nbytes), dtype=np.uint8)
    head = rng.uniform(-0.05, 0.05, (n, k // 32, 2)).astype(np.float16)  # d (and m): finite f16
    blocks[..., :4 if has_min else 2] = head[..., :2 if has_min else 1].view(np.uint8).reshape(n, k // 32, -1)
    q = quant.from_gguf(type_name, blocks, transposed=True)
    assert q.format == fmt and q.axis == -1
    x = jnp.asarray(rng.standard_normal((3, k)), jnp.float32)
    _check(_run(x, q, QuantBlockSizes(block_n=16, block_k=64, k_splits=2)), x, q, type_name)


def test_bad_operands_are_refused():
    q, _ = _case("int8", 0, 32, 128)
    x = jnp.zeros((1, 128), jnp.float32)
    with pytest.raises(ValueError, match="features"):
        quant_matmul(x[:, :64], q.values, q.scales, fmt="int8", interpret=True)
    with pytest.raises(ValueError, match="scales"):
        quant_matmul(x, q.values, q.scales, fmt="int8", group_size=32, interpret=True)
    with pytest.raises(ValueError, match="mins are for int4"):
        quant_matmul(x, q.values, q.scales, q.scales, fmt="int8", interpret=True)
    with pytest.raises(ValueError, match="must be uint8"):
        quant_matmul(x, q.values[:, :64], q.scales, fmt="int4", interpret=True)  # int8 bytes as int4
    # A tile holds whole groups: int4 over a whole (not power-of-two) row is refused, not misread.
    q4 = quant.quantize(np.ones((32, 96), np.float32), "int4", group_size=None, axis=-1)
    with pytest.raises(ValueError, match="int4 per output channel is not supported"):
        quant_matmul(x[:, :96], q4.values, q4.scales, fmt="int4", interpret=True)
    # What the model's dispatch asks before it picks the kernel: the same rules.
    assert quant_matmul_supports("int4", 32, 4096) and quant_matmul_supports("int8", None, 4104)
    assert not quant_matmul_supports("int4", None, 96) and not quant_matmul_supports("int8", 48, 96)
    assert not quant_matmul_supports("int4", 32, 100) and not quant_matmul_supports("int4", 1024, 4096)


# --- Lowering for CUDA --------------------------------------------------------------------------

TRITON = "__gpu$xla.gpu.triton"


@pytest.mark.parametrize("fmt_id", FORMATS)
@pytest.mark.parametrize("m", [1, 2048])
def test_lowers_for_cuda_at_8b_shapes(fmt_id, m):
    # Llama 3.1 8B's FFN down product (N 4096, K 14336): the decode tiles (K split) and the prefill ones.
    fmt, kw = FORMATS[fmt_id]
    n, k = 4096, 14336
    q = jax.eval_shape(lambda w: quant.quantize(w, fmt, axis=-1, **kw), jax.ShapeDtypeStruct((n, k), jnp.float32))
    arrays = [a for a in (q.values, q.scales, q.mins) if a is not None]

    def f(x, *arrays):
        return quant_matmul(x, *arrays, fmt=q.format, group_size=q.group_size, interpret=False)
    exported = jax.export.export(jax.jit(f), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16), *arrays)
    assert TRITON in set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
    assert exported.out_avals[0].shape == (m, n)


def test_gradient_lowers_for_cuda():
    # What a QLoRA step on the 8B model compiles: the kernel forward, XLA's transposed product back.
    n, k = 4096, 14336
    q = jax.eval_shape(lambda w: quant.quantize(w, "int4", axis=-1, asymmetric=True),
                       jax.ShapeDtypeStruct((n, k), jnp.float32))

    def loss(x, values, scales, mins):
        return jnp.sum(quant_matmul(x, values, scales, mins, fmt="int4", group_size=q.group_size, interpret=False))
    exported = jax.export.export(jax.jit(jax.value_and_grad(loss)), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(
        jax.ShapeDtypeStruct((512, k), jnp.bfloat16), q.values, q.scales, q.mins)
    assert TRITON in set(re.findall(r"custom_call @([\w$.]+)", exported.mlir_module()))
    dx = exported.out_avals[1]
    assert dx.shape == (512, k) and dx.dtype == jnp.bfloat16, dx
