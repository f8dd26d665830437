"""The model with the Pallas kernels (interpret mode on CPU) against the XLA path."""

import numpy as np
import pytest

import llama_jax
from tiny_models import make_hf_model


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_hf_model(tmp_path_factory.mktemp("kern"), "g3_scaled_headdim")[1]


def test_pallas_equals_xla_tiny(tiny_dir):
    ids = np.random.RandomState(0).randint(3, 211, (2, 37)).tolist()
    prompts = [ids[0][:5], ids[1][:19]]
    xla = llama_jax.load(tiny_dir, dtype="float32", attention_impl="xla", norm_impl="xla")
    pallas = llama_jax.load(tiny_dir, dtype="float32", attention_impl="pallas", norm_impl="pallas")
    want, got = xla.logits(ids), pallas.logits(ids)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=0)
    a = xla.generate(prompts, max_new_tokens=10, stop_token_ids=[])
    b = pallas.generate(prompts, max_new_tokens=10, stop_token_ids=[])
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    # Speculation's verify: the paged kernel takes each row's K + 1 positions at once.
    spec = llama_jax.api.Llama(pallas.model, speculative={"method": "ngram", "num_speculative_tokens": 3})
    repeating = [ids[0][:6] * 4, ids[1][:19]]
    a = xla.generate(repeating, max_new_tokens=12, stop_token_ids=[])
    c = spec.generate(repeating, max_new_tokens=12, stop_token_ids=[])
    assert [x.token_ids for x in a] == [x.token_ids for x in c]
    assert c[0].timings["speculative"]["proposed_tokens"] > 0  # verifies ran


def test_pallas_bf16_close_to_xla(tiny_dir):
    ids = np.random.RandomState(1).randint(3, 211, (1, 24)).tolist()
    want = llama_jax.load(tiny_dir, dtype="bfloat16", attention_impl="xla", norm_impl="xla").logits(ids)
    got = llama_jax.load(tiny_dir, dtype="bfloat16", attention_impl="pallas", norm_impl="pallas").logits(ids)
    assert np.isfinite(got).all()
    # Both round to bf16 at the same places; only the order of f32 accumulation differs.
    np.testing.assert_allclose(got, want, atol=0.05 * np.abs(want).max(), rtol=0)


def test_cudnn_needs_a_gpu(tiny_dir):
    with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
        llama_jax.load(tiny_dir, attention_impl="cudnn")


def test_mosaic_needs_a_hopper_gpu(tiny_dir):
    """The Mosaic GPU kernels are refused at load where they cannot run (their CPU interpreter is for
    tests/test_mosaic_attention.py), and "auto" never picks them off a GPU."""
    with pytest.raises(ValueError, match="mosaic.*compute capability 9.0"):
        llama_jax.load(tiny_dir, attention_impl="mosaic", dtype="bfloat16")
    assert llama_jax.RuntimeConfig().resolved().attention_impl == "xla"


def test_unknown_impl(tiny_dir):
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        llama_jax.load(tiny_dir, attention_impl="flash")


@pytest.mark.slow
def test_pallas_equals_xla_smollm2(smollm2_dir):
    xla = llama_jax.load(smollm2_dir, dtype="float32")
    prompt = xla.tokenizer.encode("The capital of France is")
    pallas = llama_jax.load(smollm2_dir, dtype="float32", attention_impl="pallas", norm_impl="pallas")
    want, got = xla.logits([prompt]), pallas.logits([prompt])
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
    a = xla.generate([prompt], max_new_tokens=6, stop_token_ids=[])[0].token_ids
    assert pallas.generate([prompt], max_new_tokens=6, stop_token_ids=[])[0].token_ids == a
