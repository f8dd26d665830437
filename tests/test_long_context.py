"""Long context: chunked prefill equals one-shot, positions out to 131K equal transformers', a 16K
prompt end to end, and bad lengths refused before anything compiles."""

import jax
import numpy as np
import pytest
import torch
from transformers import LlamaConfig as HFConfig
from transformers import LlamaForCausalLM

import llama_jax
from llama_jax import generate as gen
from tiny_models import make_hf_model

LENGTHS = (100, 37, 64)  # a ragged batch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    _, path = make_hf_model(tmp_path_factory.mktemp("long"), "g3_scaled_headdim")
    return path


def prompts(lengths=LENGTHS, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 211, n).tolist() for n in lengths]


def last_logits(lm, batch, chunk):
    """Logits [B, V] at each prompt's last token after a prefill in chunks of `chunk` tokens."""
    cache = gen.init_cache(lm.graphdef, lm.state, len(batch), -(-max(LENGTHS) // chunk) * chunk)
    _, last, _ = gen.prefill(lm.graphdef, lm.state, cache, batch, chunk)
    return np.asarray(lm.model.head(last))


@pytest.mark.parametrize("chunk", [16, 48])  # 48 divides none of the lengths
def test_chunked_prefill_equals_one_shot(tiny, chunk):
    lm = llama_jax.load(tiny, dtype="float32")
    batch = prompts()
    want = last_logits(lm, batch, chunk=128)  # one chunk holds every prompt
    got = last_logits(lm, batch, chunk=chunk)
    err = np.abs(got - want)
    assert np.isfinite(got).all()
    assert err.max() <= 1e-5 * np.abs(want).max(), f"max err {err.max():.3g} mean {err.mean():.3g}"
    # ...and both equal a full forward's logits at each prompt's last position.
    for row, p in zip(got, batch):
        full = lm.logits([p])[0, -1]
        np.testing.assert_allclose(row, full, atol=1e-5 * np.abs(full).max(), rtol=0)


def test_chunked_greedy_tokens_equal(tiny):
    one_shot = llama_jax.load(tiny, dtype="float32")
    chunked = llama_jax.load(tiny, dtype="float32", prefill_chunk=16)
    batch = prompts()
    want = [c.token_ids for c in one_shot.generate(batch, max_new_tokens=12, stop_token_ids=[])]
    got = [c.token_ids for c in chunked.generate(batch, max_new_tokens=12, stop_token_ids=[])]
    assert got == want


def test_positions_near_131k_equal_transformers(tmp_path):
    """A short sequence placed at positions 131,000 and up of a Llama 3.1-style config (rope scaling
    factor 8, original context 8192) gives transformers' logits for the same position_ids."""
    kw = dict(vocab_size=211, hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16,
              intermediate_size=88, num_hidden_layers=2, max_position_embeddings=131072, rope_theta=500000.0,
              rms_norm_eps=1e-5, initializer_range=0.25, tie_word_embeddings=False,
              rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                original_max_position_embeddings=8192))
    torch.manual_seed(7)
    hf = LlamaForCausalLM(HFConfig(**kw)).eval()
    hf.save_pretrained(tmp_path / "m")
    lm = llama_jax.load(tmp_path / "m", dtype="float32")
    assert lm.config.max_seq_len == 131072 and lm.config.rope_scaling.factor == 8.0
    ids = np.random.RandomState(1).randint(3, 211, (2, 24))
    pos = 131000 + np.stack([np.arange(24), 3 * np.arange(24)])  # contiguous, and spread out to 131069
    with torch.no_grad():
        want = hf(torch.tensor(ids), position_ids=torch.tensor(pos)).logits.numpy()
    got = lm.logits(ids.tolist(), positions=pos)
    err = np.abs(got - want)
    assert err.max() <= 1e-4 * np.abs(want).max(), f"max err {err.max():.3g} mean {err.mean():.3g}"
    # Positions matter: at 0.. the logits differ.
    assert np.abs(lm.logits(ids.tolist()) - want).max() > 1e-2 * np.abs(want).max()


@pytest.mark.slow
def test_16k_prompt_end_to_end():
    """A 16,384-token prompt through a tiny model: chunked prefill, then decode at that context. The
    first token is the argmax of a full forward's last logits, and decode continues greedily."""
    config = llama_jax.LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                   max_seq_len=16384 + 64, bos_id=None, eos_ids=())
    runtime = llama_jax.RuntimeConfig(dtype="float32", param_dtype="float32", prefill_chunk=2048)
    lm = llama_jax.from_config(config, runtime, seed=3)
    prompt = np.random.RandomState(0).randint(0, 97, 16384).tolist()
    out = lm.generate([prompt], max_new_tokens=4, stop_token_ids=[])[0].token_ids
    full = lm.logits([prompt + out[:-1]])[0]  # (T, V)
    assert np.isfinite(full).all()
    assert out == [int(np.argmax(full[len(prompt) - 1 + i])) for i in range(4)]


def test_bad_lengths_fail_before_compiling(tiny):
    lm = llama_jax.load(tiny, dtype="float32")  # max_position_embeddings 128
    jax.clear_caches()
    with pytest.raises(ValueError, match="exceeds the context"):
        lm.generate([[5] * 129], max_new_tokens=1)
    with pytest.raises(ValueError, match="exceed the context"):
        lm.generate([[5] * 100], max_new_tokens=29)
    assert gen.prefill_chunk._cache_size() == 0
    for chunk in (0, -16, 24, 1.5):
        with pytest.raises(ValueError, match="prefill_chunk must be a positive multiple of 16"):
            llama_jax.load(tiny, dtype="float32", prefill_chunk=chunk)
    with pytest.raises(ValueError, match="positions: 0..128 outside the context"):
        lm.logits([[5, 6]], positions=[[0, 128]])
