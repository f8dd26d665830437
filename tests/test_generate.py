"""Generation: KV cache against a full forward, greedy against transformers, sampling, compiles."""

import numpy as np
import pytest
import torch
import jax
import jax.numpy as jnp

import llama_jax
from llama_jax import runner
from llama_jax.sampling import sample
from tiny_models import make_hf_model


@pytest.fixture(scope="module", params=["g3_scaled_headdim", "g1_tied"])
def tiny(request, tmp_path_factory):
    hf, path = make_hf_model(tmp_path_factory.mktemp("gen"), request.param)
    return hf, llama_jax.load(path, dtype="float32")


def ragged_prompts(n=3, seed=0, lengths=(5, 13, 9)):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 211, lengths[i % len(lengths)]).tolist() for i in range(n)]


def test_cached_decode_equals_full_forward(tiny):
    """Prefill of a ragged, right-padded batch, then 12 decode steps at per-sequence positions, gives
    the logits of one full forward over each whole sequence."""
    _, lm = tiny
    model = lm.model
    prompts = ragged_prompts()
    steps = 12
    rng = np.random.RandomState(3)
    new = rng.randint(3, 211, (len(prompts), steps))
    lengths = np.array([len(p) for p in prompts], np.int32)
    tokens = np.zeros((len(prompts), 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    cache = model.init_cache(len(prompts), 32)
    logits, cache = model(jnp.asarray(tokens), cache=cache)
    got = [[np.asarray(logits[i, n - 1])] for i, n in enumerate(lengths)]
    for s in range(steps):
        pos = jnp.asarray(lengths + s)[:, None]
        step_logits, cache = model(jnp.asarray(new[:, s : s + 1]), pos, cache)
        for i in range(len(prompts)):
            got[i].append(np.asarray(step_logits[i, 0]))
    for i, p in enumerate(prompts):
        full = lm.logits([p + new[i].tolist()])[0]  # (T, V)
        want = full[len(p) - 1 :]
        err = np.abs(np.stack(got[i]) - want)
        assert np.isfinite(err).all()
        assert err.max() <= 1e-4 * np.abs(want).max(), f"seq {i}: max err {err.max():.3g} mean {err.mean():.3g}"


def test_greedy_equals_transformers_64_tokens(tiny):
    hf, lm = tiny
    prompts = ragged_prompts()
    batched = lm.generate(prompts, max_new_tokens=64, stop_token_ids=[])
    for p, out in zip(prompts, batched):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=64, min_new_tokens=64, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert out.token_ids == ref
        assert out.finish_reason == "length" and len(out.token_ids) == 64


def test_stop_token_and_finish_reason(tiny):
    _, lm = tiny
    prompts = ragged_prompts()
    free = lm.generate(prompts, max_new_tokens=20, stop_token_ids=[])
    # Stop on the 5th token each sequence would produce: it ends there, others keep going.
    stop = free[1].token_ids[4]
    out = lm.generate(prompts, max_new_tokens=20, stop_token_ids=[stop])
    for f, o in zip(free, out):
        if stop in f.token_ids:
            k = f.token_ids.index(stop)
            assert o.token_ids == f.token_ids[: k + 1] and o.finish_reason == "stop"
        else:
            assert o.token_ids == f.token_ids and o.finish_reason == "length"
    assert out[1].finish_reason == "stop" and len(out[1].token_ids) <= 5


def test_default_stop_is_checkpoint_eos(tiny):
    _, lm = tiny
    assert lm.eos_ids == (2,)  # the tiny checkpoints' eos_token_id


def test_bounded_compiles(tiny):
    """20 prompts of 20 different lengths compile the engine's prefill once per chunk bucket they
    touch (their block tables all fit the narrowest width), and its decode once."""
    _, lm = tiny
    lengths = list(range(1, 61, 3))  # 20 lengths: buckets 16, 32, 64
    jax.clear_caches()
    for i, n in enumerate(lengths):
        lm.generate([np.random.RandomState(i).randint(3, 211, n).tolist()], max_new_tokens=8, stop_token_ids=[])
    assert runner.prefill._cache_size() == 3
    assert runner.decode._cache_size() == 1


# --- Sampling -------------------------------------------------------------------------------------


def _allowed_top_p(logits, top_p):
    order = np.argsort(-logits)
    p = np.exp(logits[order] - logits.max())
    p /= p.sum()
    before = np.cumsum(p) - p
    return set(order[before < top_p].tolist())


def _sample(logits, seed, temperature, top_p=None, top_k=None):
    """llama_jax.sampling.sample with one setting for every row (each row its own stream), jitted
    as generation runs it."""
    b = logits.shape[0]
    full = lambda value, dtype: jnp.full((b,), value, dtype)  # noqa: E731
    return jax.jit(sample)(logits, full(seed, jnp.uint32) + jnp.arange(b, dtype=jnp.uint32), full(0, jnp.int32),
                  full(temperature, jnp.float32), full(1.0 if top_p is None else top_p, jnp.float32),
                  full(top_k or 0, jnp.int32))


def test_top_k_top_p_stay_in_the_allowed_set():
    rng = np.random.RandomState(0)
    logits = jnp.asarray(rng.randn(4, 50).astype(np.float32) * 3)
    for top_k, top_p in [(5, None), (None, 0.5), (None, 0.9), (10, 0.8), (1, None)]:
        seen = [set() for _ in range(4)]
        for seed in range(200):
            tok = _sample(logits, seed * 4, 1.0, top_p, top_k)
            for i, t in enumerate(np.asarray(tok)):
                seen[i].add(int(t))
        for i in range(4):
            row = np.asarray(logits[i])
            allowed = set(range(50))
            if top_k is not None:
                allowed &= set(np.argsort(-row)[:top_k].tolist())
            if top_p is not None:
                kept = row if top_k is None else np.where(np.isin(np.arange(50), list(allowed)), row, -np.inf)
                allowed &= _allowed_top_p(kept, top_p)
            assert seen[i] <= allowed, f"top_k={top_k} top_p={top_p}: {sorted(seen[i] - allowed)} outside"
            if len(allowed) > 1:
                assert len(seen[i]) > 1  # it does sample, not collapse to argmax


def test_temperature_sampling_matches_softmax():
    logits = jnp.asarray([[0.0, 1.0, 2.0]], jnp.float32)
    draws = jax.vmap(lambda s: _sample(logits, s, 2.0))(jnp.arange(4000, dtype=jnp.uint32))
    freq = np.bincount(np.asarray(draws).ravel(), minlength=3) / 4000
    want = np.exp(np.array([0, 0.5, 1.0]))
    np.testing.assert_allclose(freq, want / want.sum(), atol=0.03)


def test_seeds(tiny):
    _, lm = tiny
    prompts = ragged_prompts(2)
    kw = dict(max_new_tokens=16, temperature=1.0, top_p=0.95, stop_token_ids=[])
    a = lm.generate(prompts, seed=1, **kw)
    b = lm.generate(prompts, seed=1, **kw)
    c = lm.generate(prompts, seed=2, **kw)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


# --- Bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts, kw, match", [
    ([], {}, "empty list"),
    ([[]], {}, "empty prompt"),
    ([[5] * 125], {}, "exceed the context"),
    ([[5]], {"max_new_tokens": 128}, "exceed the context"),
    ([[5] * 129], {"max_new_tokens": 1}, "exceeds the context"),
    ([[5]], {"top_p": 0.0}, "top_p"),
    ([[5]], {"top_p": 1.5}, "top_p"),
    ([[5]], {"temperature": -0.1}, "temperature"),
    ([[5, 211]], {}, "token id 211 outside the vocabulary"),
    ([[5]], {"stop_token_ids": [999]}, "stop token id 999"),
    ([[5]], {"max_new_tokens": 0}, "max_new_tokens"),
    ("hello", {}, "list of prompts"),
])
def test_bad_input_fails_before_compiling(tiny, prompts, kw, match):
    _, lm = tiny
    jax.clear_caches()
    with pytest.raises(ValueError, match=match):
        lm.generate(prompts, **{"max_new_tokens": 8, **kw})
    assert runner.prefill._cache_size() == 0 and runner.decode._cache_size() == 0


# --- The real model -------------------------------------------------------------------------------

CHAT_QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    return llama_jax.load(smollm2_dir, dtype="float32")


@pytest.mark.slow
def test_smollm2_greedy_equals_transformers(smollm2, smollm2_hf_model):
    tok = smollm2.tokenizer
    prompts = [tok.encode(t) for t in ("The capital of France is",
                                       "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                                       "Once upon a time, in a small village by the sea, there lived an old "
                                       "fisherman who")]
    assert len({len(p) for p in prompts}) == 3
    batched = smollm2.generate(prompts, max_new_tokens=32, stop_token_ids=[])
    for p, out in zip(prompts, batched):
        with torch.no_grad():
            ref = smollm2_hf_model.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                            eos_token_id=None, pad_token_id=2)[0, len(p):].tolist()
        one = smollm2.generate([p], max_new_tokens=32, stop_token_ids=[])[0]
        assert out.token_ids == ref, (tok.decode(out.token_ids), tok.decode(ref))
        assert one.token_ids == ref
    assert batched[0].text.startswith(" Paris")


@pytest.mark.slow
def test_smollm2_chat_and_stream(smollm2, smollm2_hf_model, smollm2_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": CHAT_QUESTION}]
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert smollm2.chat_prompt(messages) == list(ids)
    with torch.no_grad():
        ref = smollm2_hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):].tolist()
    out = smollm2.chat(messages, max_new_tokens=24)
    assert out.token_ids == ref
    assert out.text.startswith("The capital of France is Paris")
    assert out.finish_reason == ("stop" if ref[-1] == 2 else "length")
    pieces = list(smollm2.stream(smollm2.chat_prompt(messages), max_new_tokens=24))
    assert len(pieces) >= 1 and "".join(pieces) == out.text
