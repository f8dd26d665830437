"""Many LoRA adapters served at once (issue 27): requests for different adapters and for the base
share the engine's batches, each row applying its own adapter's gathered A and B, and each gets the
greedy tokens of `llama_jax.load(base, lora=DIR)` alone (the adapter merged into the weights)."""

import dataclasses

import jax
import numpy as np
import pytest
from fastapi.testclient import TestClient
from tiny_models import make_hf_model

import llama_jax
from llama_jax import lora as lora_lib
from llama_jax.cli import build_parser
from llama_jax.engine import Engine, EngineThread
from llama_jax.runner import ModelRunner
from llama_jax.server import create_app

SEQ = 128


def _adapter(directory, config, lora: lora_lib.LoraConfig, seed: int):
    """A random adapter (B nonzero, so it changes the model) in PEFT's format."""
    adapters = lora_lib.init(config, lora, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    adapters = jax.tree_util.tree_map_with_path(
        lambda p, a: rng.normal(0, 0.3, a.shape).astype(np.float32) if p[-1].key == "b" else np.asarray(a),
        adapters)
    directory.mkdir()
    lora_lib.write_peft(directory, adapters, lora, config)
    return directory


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base directory, {name: adapter directory}, the Llama serving both adapters)."""
    tmp = tmp_path_factory.mktemp("lora_serving")
    _, path = make_hf_model(tmp, "g3_scaled_headdim")
    config = llama_jax.load(path, dtype="float32").config
    dirs = {"alpha": _adapter(tmp / "alpha", config, lora_lib.LoraConfig(4, 8.0, targets=("q", "v", "down")), 1),
            "beta": _adapter(tmp / "beta", config, lora_lib.LoraConfig(2, 2.0), 2)}
    return path, dirs, llama_jax.load(path, dtype="float32", adapters=dirs)


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 211, size=n)] for n in lengths]


def test_adapters_and_the_base_in_one_batch_each_get_their_merged_model_s_tokens(served):
    path, dirs, llama = served
    shared = _prompts([21])[0]  # the same 21 tokens (a full block) under each adapter: never shared KV
    prompts = [shared, shared, shared] + _prompts([5, 9, 17], seed=1)
    names = [None, "alpha", "beta", "beta", None, "alpha"]
    new = 12
    alone = {None: llama_jax.load(path, dtype="float32"),
             **{n: llama_jax.load(path, dtype="float32", lora=d) for n, d in dirs.items()}}
    want = [alone[n].generate([p], max_new_tokens=new, stop_token_ids=[])[0].token_ids
            for p, n in zip(prompts, names)]
    assert want[0] != want[1] and want[0] != want[2] and want[1] != want[2]  # the adapters change the answer

    engine = Engine(llama, max_batch=8, max_seq_len=SEQ, prefill_chunk=64, decode_steps=4)
    got = [[] for _ in prompts]
    for i, (p, n) in enumerate(zip(prompts, names)):
        request = engine.make_request(p, max_new_tokens=new, adapter=n, ignore_eos=True)
        engine.add(request, lambda out, i=i: got[i].extend(out.token_ids))
    batches = []
    while engine.has_work():
        batches.append(len(engine.scheduler.running))
        engine.step()
    assert max(batches) == len(prompts)  # every request decoded in the same batch
    assert got == want
    with pytest.raises(ValueError, match="adapter: 'gamma' is not served"):
        engine.make_request([5, 6], max_new_tokens=2, adapter="gamma")


def test_server_lists_the_adapters_routes_by_model_and_refuses_unknown_names(served):
    path, dirs, llama = served
    sched = EngineThread(Engine(llama, max_batch=4, max_seq_len=32, decode_steps=2))
    sched.warmup()
    before = ModelRunner.compiled_programs()
    sched.start()
    try:
        with TestClient(create_app(llama, engine=sched, model_name="tiny")) as c:
            models = c.get("/v1/models").json()["data"]
            assert [m["id"] for m in models] == ["tiny", "alpha", "beta"]
            assert [m["parent"] for m in models] == [None, "tiny", "tiny"]
            prompt = _prompts([7], seed=3)[0]
            for name, alone in (("beta", llama_jax.load(path, dtype="float32", lora=dirs["beta"])),
                                ("tiny", llama_jax.load(path, dtype="float32"))):
                r = c.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 6,
                                                    "temperature": 0, "ignore_eos": True, "return_token_ids": True})
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["model"] == name
                assert body["choices"][0]["token_ids"] == alone.generate([prompt], max_new_tokens=6,
                                                                         stop_token_ids=[])[0].token_ids
            r = c.post("/v1/completions", json={"model": "gamma", "prompt": prompt, "max_tokens": 2})
            assert r.status_code == 404
            error = r.json()["error"]
            assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model",
                                                                      "model_not_found")
            assert "gamma" in error["message"]
        assert ModelRunner.compiled_programs() == before  # warmup compiled the programs with adapters
    finally:
        sched.stop()


def test_speculative_verify_applies_each_row_s_adapter(served):
    path, dirs, llama = served
    prompt = [7, 8, 9, 10] * 6  # repeats: the n-gram proposer guesses
    engine = Engine(llama, max_batch=4, max_seq_len=SEQ, speculative={"method": "ngram", "num_speculative_tokens": 3})
    got = {n: [] for n in ("alpha", "beta", None)}
    for n in got:
        request = engine.make_request(prompt, max_new_tokens=24, adapter=n, ignore_eos=True)
        engine.add(request, lambda out, n=n: got[n].extend(out.token_ids))
    while engine.has_work():
        engine.step()
    assert engine.spec_steps > 0
    for n, ids in got.items():
        alone = llama_jax.load(path, dtype="float32", lora=None if n is None else dirs[n])
        assert ids == alone.generate([prompt], max_new_tokens=24, stop_token_ids=[])[0].token_ids, n


def test_serve_takes_named_adapters():
    args = build_parser().parse_args(["serve", "--lora", "a=/x", "--lora", "b=/y=z"])
    assert args.lora_modules == [("a", "/x"), ("b", "/y=z")]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--lora", "/x"])


def test_banks_pad_ranks_and_fold_the_scale(served):
    _, dirs, llama = served
    loaded = [lora_lib.read(d, llama.config) for d in dirs.values()]
    bank = lora_lib.bank(loaded, llama.config)
    (la, aa), (lb, ab) = loaded
    q = bank["layers"]["attention"]["wq"]
    assert q["a"].shape[:2] == (llama.config.n_layers, 3) and q["a"].shape[-1] == 4
    assert not q["a"][:, 0].any() and not q["b"][:, 0].any()  # entry 0: the base
    np.testing.assert_allclose(q["a"][:, 2, :, :2], ab["layers"]["attention"]["wq"]["a"], rtol=0, atol=0)
    np.testing.assert_allclose(q["b"][:, 1, :4], aa["layers"]["attention"]["wq"]["b"] * la.scale, rtol=1e-6,
                               atol=0)
    assert not q["a"][:, 2, :, 2:].any()  # rank 2 padded to 4
    assert not bank["layers"]["attention"]["wk"]["a"][:, 1].any()  # alpha adapts no k
    assert dataclasses.is_dataclass(la)
