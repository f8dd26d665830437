"""The engine (llama_jax/engine.py) over a paged KV cache: its block pool, prefix cache and preemption.

The reference for every output is llama_jax.generate's batch over a contiguous cache (no blocks, no
prefix cache, no preemption: a separate implementation), run on each request alone; the model
itself is held to transformers in test_generate.py and test_model.py.
"""

import itertools

import numpy as np
import pytest
import scipy.special

from llama_jax import api, requests
from llama_jax import generate as gen
from llama_jax.block_pool import NULL_BLOCK, BlockPool, block_keys
from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine
from llama_jax.speculative import SpeculativeConfig, propose_ngram

VOCAB = 211
# The engines of these tests share their programs (shapes): one with the default pool, and one
# whose pool is too small for its requests together (preemption).
ENGINE = dict(max_batch=4, block_size=8, decode_steps=4, prefill_chunk=32)
SMALL_POOL = dict(ENGINE, kv_cache_tokens=120)


@pytest.fixture(scope="module")
def llm():
    config = LlamaConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=88,
                         max_seq_len=512)
    return api.from_config(config, seed=3)


def _prompts(lengths, seed=0, prefix=()):
    rng = np.random.default_rng(seed)
    return [list(prefix) + [int(t) for t in rng.integers(3, VOCAB, n)] for n in lengths]


def _alone(llm, prompt, max_new, **sampling):
    """The contiguous-cache reference for one request."""
    params = requests.sampling_params(max_new_tokens=max_new, vocab_size=VOCAB, stop_token_ids=[], **sampling)
    rows, _ = gen.collect(gen.generate_ids(llm.graphdef, llm.state, [prompt], params), 1)
    return rows[0]


def _run(engine, prompts, max_new, seeds=None, **sampling):
    """Every request added at once, the engine stepped to the end: (token ids, last Output) of each.
    seeds: one per request, instead of sampling's."""
    outs = [[] for _ in prompts]
    for i, (p, m) in enumerate(zip(prompts, max_new)):
        seed = {} if seeds is None else {"seed": seeds[i]}
        engine.add(engine.make_request(p, max_new_tokens=m, ignore_eos=True, **sampling, **seed), outs[i].append)
    peak = 0
    while engine.has_work():
        engine.step()
        peak = max(peak, len(engine.scheduler.running))
    assert engine.pool.used() == 0  # every block given back
    return [[t for o in out for t in o.token_ids] for out in outs], [out[-1] for out in outs], peak


# --- The block pool ----------------------------------------------------------------------------------


def test_pool_refcounts_prefix_hits_and_lru_eviction():
    pool = BlockPool(6, 4)  # 5 usable
    tokens = list(range(12))
    keys = block_keys(tokens, 4)
    assert len(keys) == 3 and block_keys(tokens[:11], 4) == keys[:2]
    a = pool.allocate(3)
    assert NULL_BLOCK not in a and pool.available() == 2
    for i, b in enumerate(a):
        pool.register(b, keys[i], keys[i - 1] if i else None, tokens[4 * i:4 * i + 4], ready=False)
    # Pending blocks are worth waiting for, not sharing.
    assert pool.match(keys, tokens) == ([], True)
    for b in a:
        pool.mark_ready(b)
    hit, pending = pool.match(keys[:2], tokens)
    assert hit == a[:2] and not pending
    pool.release(a[::-1])  # the first owner goes: the shared two stay held, the third is cached
    assert pool.used() == 2 and pool.available() == 3
    pool.release(hit[::-1])
    assert pool.used() == 0 and pool.available() == 5
    # A different block under a colliding key is a miss: the tokens are checked.
    assert pool.match(keys, [99] + tokens[1:]) == ([], False)
    # Eviction takes free blocks first, then cached ones, least recently used (the tail) first.
    got = pool.allocate(2)
    assert set(got).isdisjoint(a)
    assert pool.allocate(1) == [a[2]]  # released first of the three
    assert pool.match(keys, tokens)[0] == a[:2]
    assert pool.allocate(1) is None  # 5 held


def test_pool_drops_pending_blocks_of_a_sequence_that_leaves():
    pool = BlockPool(4, 2)
    keys = block_keys([1, 2, 3, 4], 2)
    a = pool.allocate(2)
    pool.register(a[0], keys[0], None, [1, 2], ready=True)
    pool.register(a[1], keys[1], keys[0], [3, 4], ready=False)
    pool.release(a[::-1])
    # The ready block stays cached; the pending one was never computed and is forgotten.
    assert pool.match(keys, [1, 2, 3, 4]) == ([a[0]], False)


# --- The engine ----------------------------------------------------------------------------------------


@pytest.mark.slow  # ~20 s; make test keeps preemption in the sampled test below
def test_greedy_equals_alone_under_preemption(llm):
    """More requests than the pool holds at once: the newest are preempted and recomputed, and
    every request still gets exactly its tokens alone."""
    prompts = _prompts([5, 37, 20, 64, 9, 30])
    max_new = [30, 12, 25, 20, 33, 18]
    engine = Engine(llm, **SMALL_POOL)
    got, last, _ = _run(engine, prompts, max_new)
    assert engine.scheduler.preemptions > 0
    for p, m, g, o in zip(prompts, max_new, got, last):
        assert g == _alone(llm, p, m)
        assert o.finish_reason == "length" and o.completion_tokens == m


def test_prefix_cache_hits_give_the_same_tokens(llm):
    """Requests after a shared prefix compute only their own tokens (the first computes the prefix;
    those that arrive with it wait for its blocks), and get their tokens alone."""
    shared = _prompts([45], seed=1)[0]
    prompts = _prompts([3, 11, 7, 19], seed=2, prefix=shared)
    engine = Engine(llm, **ENGINE)
    got, last, _ = _run(engine, prompts, [10] * 4)
    assert [o.cached_tokens for o in last] == [0, 40, 40, 40]  # full 8-token blocks of the 45
    assert engine.scheduler.prefix_hit_tokens == 120
    for p, g in zip(prompts, got):
        assert g == _alone(llm, p, 10)
    # A later turn extends a finished request's tokens: its prompt and answer are cached.
    turn2 = prompts[0] + got[0] + _prompts([6], seed=5)[0]
    got2, last2, _ = _run(engine, [turn2], [8])
    assert last2[0].cached_tokens == (len(prompts[0]) + len(got[0]) - 1) // 8 * 8
    assert got2[0] == _alone(llm, turn2, 8)
    # Without the prefix cache, nothing is shared, and the tokens are the same.
    off = Engine(llm, **ENGINE, prefix_caching=False)
    got_off, last_off, _ = _run(off, prompts, [10] * 4)
    assert got_off == got and all(o.cached_tokens == 0 for o in last_off)


def test_sampling_is_the_same_alone_in_a_batch_and_after_preemption(llm):
    prompts = _prompts([13, 40, 7, 22], seed=4)
    kw = dict(temperature=0.9, top_p=0.95, top_k=40, seed=11)
    tight = Engine(llm, **SMALL_POOL)
    got, _, _ = _run(tight, prompts, [24] * 4, **kw)
    assert tight.scheduler.preemptions > 0
    for p, g in zip(prompts, got):
        assert g == _alone(llm, p, 24, **kw)


def test_many_short_requests_share_a_pool_too_small_for_their_contexts():
    """16 requests of 100 tokens run together in a pool of 8192 tokens, though each may grow to a
    4096-token context (slots of max_seq_len would fit 2); blocks held track tokens held."""
    config = LlamaConfig(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=88,
                         max_seq_len=4096)
    llm = api.from_config(config, seed=3)
    prompts = _prompts([60] * 16, seed=6)
    engine = Engine(llm, max_batch=16, max_seq_len=4096, kv_cache_tokens=8192, block_size=16, decode_steps=8)
    used = []
    outs = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.add(engine.make_request(p, max_new_tokens=40, ignore_eos=True), outs[i].append)
    peak = 0
    while engine.has_work():
        engine.step()
        running = engine.scheduler.running
        peak = max(peak, len(running))
        held = sum(s.computed for s in running)
        if running and all(s.prefilled for s in running):
            used.append((engine.pool.used(), held, len(running)))
    assert peak == 16 and engine.scheduler.preemptions == 0
    for blocks, held, n in used:  # at most one partly filled block per sequence, plus the next steps'
        assert blocks * 16 - held < n * 16 + n * 8


def test_requests_the_pool_cannot_hold_are_refused(llm):
    engine = Engine(llm, max_batch=2, kv_cache_tokens=64, block_size=16)
    with pytest.raises(ValueError, match="whole KV cache"):
        engine.make_request([5] * 40, max_new_tokens=30, ignore_eos=True)
    with pytest.raises(ValueError, match="block_size"):
        Engine(llm, block_size=12)


def test_cancel_gives_back_blocks(llm):
    engine = Engine(llm, **ENGINE)
    outs = []
    h = engine.add(engine.make_request(_prompts([20])[0], max_new_tokens=50, ignore_eos=True), outs.append)
    engine.step()
    assert engine.pool.used() > 0
    h.cancel()
    engine.step()
    assert outs[-1].finish_reason == "cancelled" and engine.pool.used() == 0 and not engine.has_work()


# --- Speculative decoding -------------------------------------------------------------------------------


def test_ngram_proposals():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3], 3, 4, 1) == [9, 1, 2]  # "1 2 3" before: what followed
    assert propose_ngram([5, 1, 2, 7, 2], 2, 4, 1) == [7, 2]  # down to the 1-gram "2"
    assert propose_ngram([1, 2, 3], 4, 4, 1) == []
    assert propose_ngram([4, 4], 4, 4, 2) == []  # no 2-gram before the last
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig.of({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ValueError, match="unknown setting 'k'"):
        SpeculativeConfig.of({"k": 3})


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "top_p": 0.95, "seed": 5}], ids=["greedy", "sampled"])
def test_speculation_gives_the_same_tokens(llm, sampling):
    """Prompts that repeat (proposals kept) and random ones (proposals missed, the backoff): every
    request gets the tokens it gets without speculation, alone, for the same seed; a repeating
    request makes several tokens per verify."""
    rng = np.random.default_rng(7)
    text = [int(t) for t in rng.integers(3, VOCAB, 10)]
    prompts = [text * 4, _prompts([25], seed=8)[0], text + text[:6]]
    engine = Engine(llm, **ENGINE, speculative={"method": "ngram", "num_speculative_tokens": 3})
    got, _, _ = _run(engine, prompts, [30, 20, 30], **sampling)
    for p, m, g in zip(prompts, [30, 20, 30], got):
        assert g == _alone(llm, p, m, **sampling)
    assert engine.spec_proposed > 0
    if not sampling:  # the random model repeats its repeated prompt: proposals hold
        assert engine.spec_accepted > engine.spec_steps


@pytest.mark.parametrize("sampling", [pytest.param({}, marks=pytest.mark.slow),  # ~16 s; sampled stays in make test
                                      {"temperature": 0.9, "top_p": 0.95, "seed": 5}], ids=["greedy", "sampled"])
def test_draft_speculation_gives_the_same_tokens(llm, sampling):
    """A draft model: with the target as its own draft every proposal holds (sampled too: it draws
    with the target's random stream); with an unrelated random draft almost none does. Either way
    every request gets the tokens it gets without speculation. A long prompt (prefilled in chunks,
    and caught up by the draft in chunks), a pool small enough to preempt, backoff after misses."""
    prompts = _prompts([70, 9, 30], seed=11)
    max_new = [26, 30, 22]
    want = [_alone(llm, p, m, **sampling) for p, m in zip(prompts, max_new)]
    other = LlamaConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=512)
    for draft, acceptance in ((llm, 1.0), (api.from_config(other, seed=9), 0.2)):
        engine = Engine(llm, **SMALL_POOL,
                        speculative={"method": "draft", "model": draft, "num_speculative_tokens": 3})
        got, _, _ = _run(engine, prompts, max_new, **sampling)
        assert got == want
        rate = engine.spec_accepted / engine.spec_proposed
        assert rate == 1.0 if acceptance == 1.0 else rate < acceptance, rate


@pytest.mark.slow  # 3000 requests: about 25 s
def test_sampled_speculation_draws_from_the_targets_distribution():
    """Sampled with a random draft (so proposals are kept, and missed, at random), the tokens a
    verify makes follow the target's own distribution: 3000 requests of one prompt (seeds 0..2999),
    their 2nd to 4th tokens (the first is the prefill's, the rest one verify's: two proposals and the
    target's token), counted in the 6^3 joint outcomes and held to the exact distribution by a
    chi-square test. The exact distribution sums the target's conditional probabilities over every
    4-token continuation; the same test must reject the draft's (it could tell them apart)."""
    from scipy import stats

    vocab, temperature, n = 6, 0.8, 3000
    config = LlamaConfig(vocab_size=vocab, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=64)
    target, draft = api.from_config(config, seed=1), api.from_config(config, seed=2)
    prompt = [1, 2, 3, 4, 5]
    engine = Engine(target, max_batch=64, block_size=8, prefill_chunk=32,
                    speculative={"method": "draft", "model": draft, "num_speculative_tokens": 3})
    got, _, _ = _run(engine, [prompt] * n, [4] * n, temperature=temperature, seeds=range(n))
    assert 0.1 < engine.spec_accepted / engine.spec_proposed < 0.9
    outcome = np.array(got)[:, 1:] @ vocab ** np.arange(2, -1, -1)
    counts = np.bincount(outcome, minlength=vocab**3)

    def chi_square_p(model) -> float:
        seqs = np.array(list(itertools.product(range(vocab), repeat=4)))
        logits = model.logits([prompt + list(s) for s in seqs])[:, len(prompt) - 1:-1].astype(np.float64)
        logp = scipy.special.log_softmax(logits / temperature, axis=-1)
        p = np.exp(np.take_along_axis(logp, seqs[..., None], -1).sum((1, 2)))
        want = p.reshape(vocab, -1).sum(0) * n  # summed over the first token
        rare = want < 5  # pooled, as the test's approximation needs
        return stats.chisquare(np.append(counts[~rare], counts[rare].sum()),
                               np.append(want[~rare], want[rare].sum())).pvalue

    assert chi_square_p(target) > 1e-3
    assert chi_square_p(draft) < 1e-6


def test_draft_must_share_the_vocabulary(llm, tmp_path):
    other = LlamaConfig(vocab_size=VOCAB + 1, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=64)
    with pytest.raises(ValueError, match="speculative model: its vocabulary"):
        Engine(llm, **ENGINE, speculative={"method": "draft", "model": api.from_config(other)})
    with pytest.raises(ValueError, match="speculative model: .*no such model directory"):
        SpeculativeConfig.of({"method": "draft", "model": str(tmp_path / "none")})
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeConfig.of({"method": "draft"})


def test_generate_speculates_and_reports(llm):
    spec = api.Llama(llm.model, speculative={"method": "ngram", "num_speculative_tokens": 3})
    text = _prompts([12], seed=9)[0] * 3
    [plain] = llm.generate([text], max_new_tokens=24, stop_token_ids=[])
    [fast] = spec.generate([text], max_new_tokens=24, stop_token_ids=[])
    assert fast.token_ids == plain.token_ids
    report = fast.timings["speculative"]
    assert report["proposed_tokens"] > 0 and 0 <= report["acceptance_rate"] <= 1
