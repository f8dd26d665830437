"""The C++ CPU backend's quantized products (cpu_kernels.qlinear) against llama_jax.quant's dequantized
weight times x in float64: every format (int8 per row and in groups, int4 symmetric and with mins,
fp8), decode rows (fewer than cpu_kernels.quant.PANEL_ROWS: the bytes expanded in registers) and prefill rows
(dequantized panels through MKL), the gradient with respect to x, the default model's own GGUF
blocks, and whole models with the backend on and off."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cpu_kernels
from cpu_kernels import quant as cq
from llama_jax import quant
from numerics import assert_close, tolerances

pytestmark = pytest.mark.skipif(cpu_kernels.load() is not None, reason=f"cpu_kernels: {cpu_kernels.load()}")

# (id, format, group_size, asymmetric, scales dtype): what llama_jax.quant makes, GGUF's Q8_0 / Q4_0 /
# Q4_1 forms (f16 scales in groups of 32), and larger groups.
CASES = [
    ("int8-row", "int8", None, False, jnp.float32),
    ("int8-g32-f16", "int8", 32, False, jnp.float16),
    ("int8-g64", "int8", 64, False, jnp.float32),
    ("int4-g32", "int4", 32, False, jnp.float16),
    ("int4-g32-min", "int4", 32, True, jnp.float16),
    ("int4-g64-min", "int4", 64, True, jnp.float16),
    ("int4-g128", "int4", 128, False, jnp.float16),
    ("int4-row", "int4", None, False, jnp.float16),
    ("fp8-row", "fp8", None, False, jnp.float32),
]
# Rows of x: decode (fewer than 16, in tiles of 4 rows: 6 and 15 end on ragged tiles of 2 and 3) and
# prefill (16 and up).
ROWS = [1, 6, 15, 16, 40]
# (N, K): odd N, small enough for one thread, and large enough to be split over the pool.
SHAPES = [(37, 128), (203, 384)]


def _weight(case, n, k, seed):
    _, fmt, group, asym, scale_dtype = case
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    kw = dict(asymmetric=True) if asym else {}
    q = quant.quantize(w, fmt, group_size=group, axis=-1, **kw)
    q = quant.QArray(q.values, q.scales.astype(scale_dtype), q.mins, fmt, group, -1)
    return w, q


def _x(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _scale(x, q):
    """The largest term of a product: max|x| * max|w|, what f32 rounding errors scale with."""
    return float(np.abs(x).max() * np.abs(np.asarray(quant.dequantize(q))).max())


def _qlinear(x, q):
    return jax.jit(lambda x, v, s, m: cq.qlinear(x, v, s, m, format=q.format, group_size=q.group_size))(
        x, q.values, q.scales, q.mins)


def _exact(x, q):
    """x @ W^T in float64, W the weight q stands for (llama_jax.quant.dequantize)."""
    return np.asarray(x, np.float64) @ np.asarray(quant.dequantize(q), np.float64).T


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_qlinear_equals_the_dequantized_product(case, shape):
    n, k = shape
    _, q = _weight(case, n, k, seed=n)
    for m in ROWS:
        x = _x((m, k), seed=m)
        # The decode kernels apply a group's scale (and min) to its partial sum instead of to each
        # weight: a sum of k terms in f32 either way.
        assert_close(_qlinear(x, q), _exact(x, q), **tolerances(jnp.float32, k, scale=_scale(x, q)),
                     name=f"{case[0]} M={m}")


@pytest.mark.parametrize("rows", [3, 20])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[8]], ids=lambda c: c[0])
def test_gradient_is_g_times_the_dequantized_weight(case, rows):
    """The x-gradient of a frozen quantized layer (a LoRA base): g @ W, in f32 through the panels."""
    n, k = 37, 256
    _, q = _weight(case, n, k, seed=5)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, rows, k)).astype(np.float32)
    g = rng.standard_normal((2, rows, n)).astype(np.float32)

    def loss(x):
        return jnp.sum(cq.qlinear(x, q.values, q.scales, q.mins, format=q.format, group_size=q.group_size) * g)

    dx = jax.jit(jax.grad(loss))(x)
    want = np.asarray(g, np.float64) @ np.asarray(quant.dequantize(q), np.float64)
    scale = float(np.abs(g).max() * np.abs(np.asarray(quant.dequantize(q))).max())
    assert_close(dx, want, **tolerances(jnp.float32, n, scale=scale), name="dx")


def test_from_two_threads_at_once():
    # XLA runs independent products concurrently (q, k and v): one takes the spinning pool, the
    # others run on their own threads; all must come out right.
    qs = [_weight(CASES[4], 1536, 576, seed=s)[1] for s in range(3)]
    x = _x((1, 576), seed=7)

    def products(x, *arrays):
        return [cq.qlinear(x, v, s, m, format="int4", group_size=32) for v, s, m in zip(*[iter(arrays)] * 3)]

    outs = jax.jit(products)(x, *[a for q in qs for a in (q.values, q.scales, q.mins)])
    for out, q in zip(outs, qs):
        assert_close(out, _exact(x, q), **tolerances(jnp.float32, 576, scale=_scale(x, q)), name="value")


@pytest.fixture(scope="module")
def smollm2_gguf_tensors():
    """The default model's GGUF tensors by name (reading the file's header takes seconds)."""
    gguf = pytest.importorskip("gguf")
    from llama_jax import default_model

    try:
        path = default_model.gguf_path()
    except default_model.DefaultModelMissing as e:
        pytest.skip(str(e))
    return {t.name: t for t in gguf.GGUFReader(path, "r").tensors}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.0.attn_k.weight", "token_embd.weight"])
def test_the_default_models_gguf_blocks(smollm2_gguf_tensors, name):
    """SmolLM2's own file: Q4_1 layers and the Q8_0 embedding (the tied output head), their blocks
    kept byte for byte by from_gguf and multiplied as they are stored."""
    t = smollm2_gguf_tensors[name]
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # (out, in)
    q = quant.from_gguf(t.tensor_type.name, quant.gguf_block_array(t.data, t.tensor_type.name, shape), transposed=True)
    for m in (1, 3, 16):
        x = _x((m, shape[1]), seed=m)
        assert_close(_qlinear(x, q), _exact(x, q), **tolerances(jnp.float32, shape[1], scale=_scale(x, q)),
                     name=f"{name} M={m}")


def test_supports_and_errors():
    assert cq.supports("int4", 32, 576) and cq.supports("int8", None, 96) and cq.supports("fp8", None, 64)
    assert not cq.supports("int4", 32, 96)  # int4 reads whole 64-input chunks
    assert not cq.supports("int8", 48, 96) and not cq.supports("fp8", 32, 64)
    _, q = _weight(CASES[4], 8, 64, seed=0)
    x = jnp.zeros((1, 64))
    with pytest.raises(ValueError, match="x must be float32"):
        cq.qlinear(x.astype(jnp.bfloat16), q.values, q.scales, q.mins, format="int4", group_size=32)
    with pytest.raises(ValueError, match="values must be 2-D uint8"):
        cq.qlinear(x, q.values.astype(jnp.int8), q.scales, q.mins, format="int4", group_size=32)
    with pytest.raises(ValueError, match=r"mins must be float16 \[8, 2\] for int4"):
        cq.qlinear(x, q.values, q.scales, q.mins[:, :1], format="int4", group_size=32)
    with pytest.raises(ValueError, match=r"scales must be float16 \[8, 2\] for int4"):
        cq.qlinear(x, q.values, q.scales.astype(jnp.float32), q.mins, format="int4", group_size=32)
    with pytest.raises(ValueError, match="x has 32 features"):
        cq.qlinear(x[:, :32], q.values, q.scales, q.mins, format="int4", group_size=32)
    with pytest.raises(ValueError, match="not supported"):
        cq.qlinear(x, q.values, q.scales, q.mins, format="int4", group_size=48)
    with pytest.raises(ValueError, match=r"scales must be float16 \[8, 2\] for int4, got None"):
        cq.qlinear(x, q.values, None, q.mins, format="int4", group_size=32)
    _, q8 = _weight(CASES[0], 8, 64, seed=0)
    with pytest.raises(ValueError, match="mins are for int4 only"):
        cq.qlinear(x, q8.values, q8.scales, q8.scales, format="int8", group_size=None)
    with pytest.raises(ValueError, match="format 'int2' is not one of"):
        cq.qlinear(x, q8.values, q8.scales, format="int2", group_size=None)


# --- Whole models -----------------------------------------------------------------------------------

from llama_jax import api, model as model_lib  # noqa: E402
from llama_jax.config import RuntimeConfig  # noqa: E402
from test_quant import QCONFIG  # noqa: E402

ON = RuntimeConfig(param_dtype="float32", dtype="float32", cpu_kernels="on")
OFF = dataclasses.replace(ON, cpu_kernels="off")


@pytest.mark.parametrize("fmt", ["int4", pytest.param("int8", marks=pytest.mark.slow),
                                 pytest.param("fp8", marks=pytest.mark.slow)])
def test_tiny_quantized_model_with_the_backend_on_and_off(fmt):
    """The same quantized parameters through the backend (ops._qlinear sends every product here: a
    FFN of 128 keeps int4's inputs in whole 64-input chunks) and through XLA's dequantize-then-dot.
    Decode rows (one sequence of 5 tokens) and prefill rows (2 x 24) give the same logits: both are
    f32 sums of the same dequantized weights times the same activations, differing in order only,
    so the bound is the f32 one test_quant.py uses, 2e-5 of the largest logit."""
    config = dataclasses.replace(QCONFIG, ffn_dim=128)
    qparams = quant.quantize_params(api.from_config(config, OFF, seed=4).params, fmt, model_lib.LINEAR_WEIGHTS)
    on, off = api.from_params(config, qparams, ON), api.from_params(config, qparams, OFF)
    rng = np.random.default_rng(5)
    for shape in ((1, 5), (2, 24)):
        tokens = rng.integers(0, config.vocab_size, shape)
        got, want = on.logits(tokens), off.logits(tokens)
        assert_close(got, want, atol=2e-5 * np.abs(want).max(), rtol=0, name=f"{fmt} {shape}")


@pytest.mark.slow
def test_the_default_model_kept_as_q4_1_gives_its_float32_logits():
    """Issue 25's bar: SmolLM2 with its GGUF blocks kept (Q4_1 layers, a Q8_0 embedding and tied
    head) gives the logits of its float32 dequantization within 1e-4, both through the backend: for
    a few tokens (the decode kernels, which differ from a float32 product in summation order only)
    and a prompt of 40 (the dequantized panels: the same sgemm on the same floats, so equal). Against
    XLA's float32 model (no backend) the kept model is as close as the backend's own float32 model
    is: the floor there is f32 rounding, about 1e-4 on logits of up to 35."""
    from conftest import default_model_env
    from llama_jax.default_model import MODEL_DIR

    path = os.path.join(default_model_env()["LLAMA_JAX_CACHE"], MODEL_DIR)  # the tests' cache, not the user's
    kept = api.load(path, cpu_kernels="on")
    assert quant.is_quantized(kept.params)
    dense = quant.dequantize_params(kept.params, jnp.float32)
    ref, xla = api.from_params(kept.config, dense, ON), api.from_params(kept.config, dense, OFF)
    rng = np.random.default_rng(6)
    for length in (6, 40):
        tokens = rng.integers(3, kept.config.vocab_size, (1, length))
        got, want, floor = kept.logits(tokens), ref.logits(tokens), xla.logits(tokens)
        assert_close(got, want, atol=1e-4, rtol=0, name=f"{length} tokens")
        if length >= max(cpu_kernels.MIN_ROWS, cq.PANEL_ROWS):  # both through sgemm
            np.testing.assert_array_equal(got, want)
        f32_err = np.abs(want - floor).max()
        assert np.abs(got - floor).max() <= 2 * f32_err + 1e-5, f"{length} tokens: vs XLA, f32 floor {f32_err:.3g}"
