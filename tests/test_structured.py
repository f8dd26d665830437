"""Structured output (llama_jax/structured.py), its mask in the sampler, and log-probabilities.

The grammar side runs on both tokenizer kinds (SmolLM2's tokenizer.json, Llama 3's tiktoken file);
the engine side on a small random model that reads SmolLM2's vocabulary: a random model follows no
instruction, so every valid JSON it writes is the grammar's doing, and its schemas are bounded
(maxLength, maxItems, enums) so that every answer ends within its tokens. The real model is held to
the same through the server in test_server.py.
"""

import json

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from llama_jax import api, requests, runner, sampling, structured
from llama_jax import engine as engine_lib
from llama_jax.config import LlamaConfig
from llama_jax.engine import Engine
from llama_jax.tokenizer import Llama3Tokenizer, load_tokenizer

TEXT = 'Héllo wörld 😀 {"a": [1, 2.5e-3, null]}\n\n\t 日本語 <|im_end|> <|eot_id|>'

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
                         "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smol_tok(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def llama3_tok(llama3_model_path):
    return Llama3Tokenizer(llama3_model_path)


def _bits(mask_row: np.ndarray, vocab: int) -> np.ndarray:
    return np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab].astype(bool)


# --- Grammars over both tokenizer kinds ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["smollm2", "llama3"])
def test_token_bytes_spell_the_text(kind, smol_tok, llama3_tok):
    tok = smol_tok if kind == "smollm2" else llama3_tok
    vocab = tok.token_bytes()
    assert len(vocab) == tok.vocab_size
    ids = tok.encode(TEXT)
    assert b"".join(vocab[i] for i in ids) == TEXT.encode()
    # Byte-level pieces of one character: each token holds a part, none is replaced.
    assert any(len(vocab[i]) and vocab[i].decode("utf-8", errors="replace") != vocab[i].decode("latin-1")
               for i in ids)
    for text, i in tok.special_tokens.items():
        assert vocab[i] == text.encode()


@pytest.mark.parametrize("kind", ["smollm2", "llama3"])
def test_masks_follow_the_schema_and_stop_only_at_its_end(kind, smol_tok, llama3_tok):
    tok = smol_tok if kind == "smollm2" else llama3_tok
    eos = [tok.eos_ids[-1]]
    grammars = structured.Grammars(tok, tok.vocab_size, eos)
    schema = structured.schema_text(PERSON)
    answer = '{"name": "Bob", "age": 42, "tags": ["red", "blue"], "ok": true}'
    jsonschema.validate(json.loads(answer), PERSON)
    m = grammars.matcher(schema, eos)
    width = structured.mask_width(tok.vocab_size)
    specials = sorted(set(tok.special_tokens.values()) - set(eos))
    for t in tok.encode(answer):
        masks = structured.next_masks([m], width)
        allowed = _bits(masks[0], tok.vocab_size)
        assert allowed[t] and not allowed[eos[0]] and not allowed[specials].any()
        m.accept(t)
    allowed = _bits(structured.next_masks([m], width)[0], tok.vocab_size)
    assert np.flatnonzero(allowed).tolist() == eos  # the JSON is whole: only the stop id may follow
    m.accept(eos[0])
    assert m.terminated
    # A token the grammar does not allow is refused.
    fresh = grammars.matcher(schema, eos)
    fresh.accept(tok.encode("{")[0])
    with pytest.raises(RuntimeError, match="outside its grammar"):
        fresh.accept(tok.encode("x")[0])


def test_grammars_compile_once_per_schema_and_refuse_bad_ones(smol_tok):
    grammars = structured.Grammars(smol_tok, smol_tok.vocab_size, smol_tok.eos_ids, cache_size=2)
    a, b, c = (structured.schema_text(s) for s in (PERSON, {"type": "string"}, {"type": "array"}))
    assert grammars.compile(a) is grammars.compile(a) and grammars.compiled == 1
    grammars.compile(a, or_text=True)  # another grammar: the schema's JSON, or text
    assert grammars.compiled == 2
    grammars.compile(b)
    grammars.compile(c)  # past cache_size: the least recently used go
    grammars.compile(a)
    assert grammars.compiled == 5
    for bad, match in ((json.dumps({"type": "nonsense"}), 'Unsupported type "nonsense"'),
                       (json.dumps({"$ref": "#/nowhere"}), "nowhere")):
        with pytest.raises(ValueError, match=match) as e:
            grammars.compile(bad)
        assert str(e.value).startswith("json_schema: ") and "\n" not in str(e.value) and ".cc" not in str(e.value)
    for bad in ("[1, 2]", "{", 5):
        with pytest.raises(ValueError, match="json_schema"):
            structured.schema_text(bad)


def test_json_or_text(smol_tok):
    """tool_choice "auto"'s grammar: a text that begins a JSON object is held to the schema, any
    other text is free."""
    grammars = structured.Grammars(smol_tok, smol_tok.vocab_size, smol_tok.eos_ids)
    call = structured.schema_text({"type": "object", "properties": {"name": {"const": "f"}}, "required": ["name"]})
    width, eos = structured.mask_width(smol_tok.vocab_size), smol_tok.eos_ids[0]

    def follows(text):
        m = grammars.matcher(call, [eos], or_text=True)
        for t in smol_tok.encode(text):
            if not _bits(structured.next_masks([m], width)[0], smol_tok.vocab_size)[t]:
                return False
            m.accept(t)
        return bool(_bits(structured.next_masks([m], width)[0], smol_tok.vocab_size)[eos])

    assert follows('{"name": "f"}') and follows("Sure, {no} JSON here.") and follows("")
    assert not follows('{"name": "g"}') and not follows('{"other": 1}')


# --- The sampler: masks and log-probabilities -----------------------------------------------------------


def test_sampler_keeps_to_the_mask_and_reports_the_distribution_it_drew_from():
    rng = np.random.default_rng(0)
    b, v = 6, 200
    logits = jnp.asarray(rng.normal(size=(b, v)) * 3, jnp.float32)
    allowed = rng.random((b, v)) < 0.3
    allowed[:, 7] = True
    words = np.zeros((b, structured.mask_width(v) * 32), bool)
    words[:, :v] = allowed
    mask = np.packbits(words, axis=-1, bitorder="little").view(np.int32)  # xgrammar's layout
    assert (np.asarray(sampling.allowed_tokens(jnp.asarray(mask), v)) == allowed).all()
    seeds, counts = jnp.arange(b, dtype=jnp.uint32), jnp.full(b, 3, jnp.int32)
    temperature = jnp.asarray([0, 0.7, 1.0, 1.3, 0, 0.5], jnp.float32)
    top_p = jnp.asarray([1, 1, 0.8, 1, 0.5, 0.9], jnp.float32)
    top_k = jnp.asarray([0, 5, 0, 0, 3, 40], jnp.int32)
    args = (logits, seeds, counts, temperature, top_p, top_k)
    tokens = np.asarray(sampling.sample(*args, allowed=jnp.asarray(mask)))
    token_lp, lp = sampling.sample(*args, allowed=jnp.asarray(mask), logprobs=True)
    assert (np.asarray(token_lp) == tokens).all()  # reporting changes no draw
    assert allowed[np.arange(b), tokens].all()
    # Without a mask and without logprobs: the sampler as it was (no row sees the other options).
    plain = np.asarray(sampling.sample(*args))
    assert (np.asarray(sampling.sample(*args, logprobs=True)[0]) == plain).all()

    x = np.where(allowed, np.asarray(logits, np.float64), -np.inf)
    for r in range(b):
        t = float(temperature[r])
        z = x[r] / (t if t > 0 else 1.0)
        if t > 0:  # a sampled row's distribution is filtered: top-k, then top-p of what is left
            desc = np.sort(z)[::-1]
            k = int(top_k[r]) or v
            desc = np.where(np.arange(v) < k, desc, -np.inf)
            p = np.exp(desc - desc[0])
            p /= p.sum()
            before = np.cumsum(p) - p
            cutoff = desc[before < float(top_p[r])].min() if float(top_p[r]) < 1 else -np.inf
            z = np.where((z < desc[k - 1]) | (z < cutoff), -np.inf, z)
        else:
            assert tokens[r] == np.argmax(x[r])
        want = z - np.logaddexp.reduce(z[np.isfinite(z)])
        np.testing.assert_allclose(float(lp.token[r]), want[tokens[r]], rtol=1e-4, atol=1e-4)
        n = min(sampling.TOP_LOGPROBS, int(np.isfinite(want).sum()))
        assert set(np.asarray(lp.top_ids[r])[:n].tolist()) == set(np.argsort(-want)[:n].tolist())
        np.testing.assert_allclose(np.asarray(lp.top[r])[:n], np.sort(want)[::-1][:n], rtol=1e-4, atol=1e-4)


# --- The engine: a small random model reading SmolLM2's vocabulary --------------------------------------

ENGINE = dict(max_batch=4, block_size=8, decode_steps=4, prefill_chunk=32, max_seq_len=256)


@pytest.fixture(scope="module")
def llm(smol_tok):
    config = LlamaConfig(vocab_size=smol_tok.vocab_size, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=88,
                         max_seq_len=512, bos_id=smol_tok.bos_id, eos_ids=tuple(smol_tok.eos_ids))
    return api.Llama(api.from_config(config, seed=5).model, tokenizer=smol_tok)


def _prompt(llm, text):
    return llm.tokenizer.encode(text)


def _run(engine, reqs):
    """Every request added at once, the engine stepped to the end: (ids, text, logprobs, finish) of each."""
    outs = [[] for _ in reqs]
    for i, r in enumerate(reqs):
        engine.add(r, outs[i].append)
    while engine.has_work():
        engine.step()
    assert engine.pool.used() == 0
    return [([t for o in out for t in o.token_ids], "".join(o.text for o in out),
             None if out[-1].logprobs is None else [lp for o in out for lp in o.logprobs], out[-1].finish_reason)
            for out in outs]


@pytest.mark.slow
def test_a_grammar_row_beside_plain_rows(llm):
    """In one batch: rows under a schema (greedy and sampled) answer valid JSON that ends where the
    JSON does; the plain rows beside them get the very tokens they get without them."""
    engine = Engine(llm, **ENGINE)
    p = [_prompt(llm, t) for t in ("Tell me about Bob.", "A person as JSON:", "Once upon a time", "The sky is")]
    plain = [dict(max_new_tokens=30), dict(max_new_tokens=30, temperature=0.9, top_p=0.9, seed=4)]
    alone = _run(engine, [engine.make_request(q, **kw) for q, kw in zip(p[2:], plain)])
    schema = dict(PERSON, title="one row beside others")  # a schema no other test compiles
    before = engine.grammars.compiled
    mixed = _run(engine, [engine.make_request(p[0], max_new_tokens=100, json_schema=schema),
                          engine.make_request(p[1], max_new_tokens=100, json_schema=schema, temperature=1.0, seed=9),
                          *(engine.make_request(q, **kw) for q, kw in zip(p[2:], plain))])
    assert [m[0] for m in mixed[2:]] == [a[0] for a in alone]
    eos = llm.tokenizer.eos_ids
    for ids, text, _, finish in mixed[:2]:
        jsonschema.validate(json.loads(text), PERSON)
        assert finish == "stop" and ids[-1] in eos and not set(ids[:-1]) & set(eos)
    assert engine.grammars.compiled == before + 1  # one schema, compiled once


@pytest.mark.slow
def test_grammar_rows_survive_preemption_and_speculation(llm):
    """Sampled grammar rows in a pool too small for all of them (preempted and recomputed, their
    matchers kept), and in a speculating engine, answer what each answers alone."""
    prompts = [_prompt(llm, f"Person number {i}, described:") for i in range(4)]
    reqs = lambda e: [e.make_request(q, max_new_tokens=100, json_schema=PERSON, temperature=1.0, seed=i)  # noqa: E731
                      for i, q in enumerate(prompts)]
    roomy = Engine(llm, **ENGINE)
    alone = [_run(roomy, [r])[0] for r in reqs(roomy)]
    tight = Engine(llm, **dict(ENGINE, kv_cache_tokens=120))
    assert [g[:2] for g in _run(tight, reqs(tight))] == [a[:2] for a in alone]
    assert tight.scheduler.preemptions > 0
    spec = Engine(llm, **ENGINE, speculative={"method": "ngram", "num_speculative_tokens": 3})
    assert [g[:2] for g in _run(spec, reqs(spec))] == [a[:2] for a in alone]
    for _, text, _, _ in alone:
        jsonschema.validate(json.loads(text), PERSON)


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    finite = np.isfinite(x)
    return np.where(finite, x - np.logaddexp.reduce(x[finite]), -np.inf)


@pytest.mark.slow
def test_logprobs_are_the_log_softmax_of_the_logits(llm):
    """Greedy: each token's logprob and its top alternatives are log_softmax of Llama.logits at its
    position (after the grammar's mask, for a grammar row), and asking for them changes no token."""
    engine = Engine(llm, **ENGINE)
    prompt = _prompt(llm, "Hello there")
    n = 5
    [(ids, _, lps, _), (ids_plain, _, none, _), (json_ids, text, json_lps, _)] = _run(engine, [
        engine.make_request(prompt, max_new_tokens=12, logprobs=n),
        engine.make_request(prompt, max_new_tokens=12),
        engine.make_request(prompt, max_new_tokens=80, json_schema=PERSON, logprobs=2)])
    assert ids == ids_plain and none is None and len(lps) == len(ids)
    logits = llm.logits([prompt + ids])[0, len(prompt) - 1:]
    for k, (t, lp) in enumerate(zip(ids, lps)):
        want = _log_softmax(logits[k])
        np.testing.assert_allclose(lp.logprob, want[t], atol=1e-4)
        assert [i for i, _ in lp.top] == np.argsort(-want)[:n].tolist()
        np.testing.assert_allclose([v for _, v in lp.top], np.sort(want)[::-1][:n], atol=1e-4)
    # Under a grammar: the distribution the mask leaves, renormalized.
    grammars = engine.grammars
    m = grammars.matcher(structured.schema_text(PERSON), llm.tokenizer.eos_ids)
    width = structured.mask_width(llm.config.vocab_size)
    logits = llm.logits([prompt + json_ids])[0, len(prompt) - 1:]
    for k, (t, lp) in enumerate(zip(json_ids, json_lps)):
        allowed = _bits(structured.next_masks([m], width)[0], llm.config.vocab_size)
        want = _log_softmax(np.where(allowed, logits[k], -np.inf))
        np.testing.assert_allclose(lp.logprob, want[t], atol=1e-4)
        assert [i for i, _ in lp.top] == [i for i in np.argsort(-want)[:2] if np.isfinite(want[i])]
        m.accept(t)
    jsonschema.validate(json.loads(text), PERSON)


def test_sampled_logprobs_change_no_token(llm):
    engine = Engine(llm, **ENGINE)
    prompt = _prompt(llm, "Random words:")
    kw = dict(max_new_tokens=16, temperature=0.8, top_k=50, seed=2)
    [(a, _, lps, _), (b, _, _, _)] = _run(engine, [engine.make_request(prompt, logprobs=20, **kw),
                                                   engine.make_request(prompt, **kw)])
    assert a == b
    assert all(len(lp.top) == 20 and lp.top[0][1] >= lp.logprob for lp in lps)


def test_plain_programs_compute_nothing_extra(llm):
    """A decode call without grammar rows or logprobs traces no host callback and no top-k: the
    program the engine ran before these options."""
    engine = Engine(llm, **ENGINE)
    r = engine.runner
    b, width = 2, engine.max_width
    rows = runner.Rows(np.zeros(b, np.int32), np.zeros(b, np.int32), np.zeros(b, np.int32), np.ones(b, np.int32),
                       np.full((b, runner.MAX_STOP_IDS), -1, np.int32), np.zeros(b, bool),
                       engine_lib._sampling_zeros(b))
    table = np.zeros((b, width), np.int32)
    grammar = runner.GrammarCall(np.full((b, structured.mask_width(llm.config.vocab_size)), -1, np.int32),
                                 np.int32(0))

    def primitives(*args, **kw):
        jaxpr = runner.decode.trace(r.graphdef, r.state, r.pool, 4, rows, table, *args, **kw).jaxpr
        return str(jaxpr)

    plain, with_lp, with_grammar = primitives(), primitives(logprobs=True), primitives(grammar)
    assert "io_callback" not in plain and "top_k" not in plain
    assert "top_k" in with_lp and "io_callback" not in with_lp
    assert "io_callback" in with_grammar and "top_k" not in with_grammar


def test_generate_takes_a_schema(llm):
    """`Llama.generate(json_schema=...)`, and the engine's drive of it."""
    params = requests.sampling_params(max_new_tokens=100, vocab_size=llm.config.vocab_size, eos_ids=llm.eos_ids,
                                      json_schema=PERSON, temperature=1.0, seed=1)
    prompts = [_prompt(llm, "One:"), _prompt(llm, "Two, a longer prompt:")]
    got = [[] for _ in prompts]
    for step in engine_lib.generate_ids(llm, prompts, params):
        for row, new in zip(got, step):
            row += new
    for ids in got:
        assert ids[-1] in llm.eos_ids
        jsonschema.validate(json.loads(llm.tokenizer.decode(ids[:-1])), PERSON)
    # Llama.generate: the same, and its completions say where the JSON ended.
    for c in llm.generate(["Three:", "Four, a longer prompt:"], max_new_tokens=100, json_schema=PERSON,
                          temperature=1.0, seed=1):
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.text), PERSON)
    with pytest.raises(ValueError, match="json_schema: .*nonsense"):
        llm.generate(["x"], max_new_tokens=4, json_schema={"type": "nonsense"})
    with pytest.raises(ValueError, match="stop token id"):
        requests.sampling_params(max_new_tokens=4, vocab_size=llm.config.vocab_size, stop_token_ids=[],
                                 json_schema=PERSON)
    with pytest.raises(ValueError, match="logprobs"):
        requests.sampling_params(max_new_tokens=4, vocab_size=llm.config.vocab_size, logprobs=21)
