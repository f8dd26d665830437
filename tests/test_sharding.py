"""Sharded inference on 8 fake CPU devices (tests/conftest.py sets them up before JAX starts)."""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import llama_jax
from llama_jax import sharding
from tiny_models import make_hf_model

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    """A tiny checkpoint with 8 KV heads (16 query heads), every split dimension divisible by 8."""
    _, path = make_hf_model(tmp_path_factory.mktemp("shard"), "kv8")
    return path


def ragged8():
    rng = np.random.RandomState(5)
    return [rng.randint(3, 256, n).tolist() for n in (3, 17, 9, 30, 1, 12, 22, 6)]


@pytest.fixture(scope="module")
def reference(tiny8):
    single = llama_jax.load(tiny8, dtype="float32")
    prompts = ragged8()
    ids = np.random.RandomState(6).randint(3, 256, (8, 24)).tolist()
    return single.logits(ids), ids, [c.token_ids for c in single.generate(prompts, max_new_tokens=12, stop_token_ids=[])]


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("dp, tp", MESHES)
def test_sharded_equals_single_device(tiny8, reference, dp, tp, impl):
    ref_logits, ids, ref_tokens = reference
    mesh = llama_jax.make_mesh(dp=dp, tp=tp)
    model = llama_jax.load(tiny8, dtype="float32", mesh=mesh, attention_impl=impl, norm_impl=impl)
    out = model.logits(ids)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
    tokens = [c.token_ids for c in model.generate(ragged8(), max_new_tokens=12, stop_token_ids=[])]
    assert tokens == ref_tokens


@pytest.mark.parametrize("dp, tp", MESHES)
def test_shard_shapes(tiny8, dp, tp):
    mesh = llama_jax.make_mesh(dp=dp, tp=tp)
    model = llama_jax.load(tiny8, dtype="float32", mesh=mesh)
    c = model.config
    layer = model.state["layers"][0]
    # Per-layer weights run [out, in] and unfused under a mesh (api.inference_layout): wq, wk, wv, w1, w3 split
    # by output features (axis 0), wo and w2 by input features (axis 1).
    split = {  # (full shape, the axis split over 'model')
        "wq": (layer["attention"]["wq"][...], 0), "wk": (layer["attention"]["wk"][...], 0),
        "wv": (layer["attention"]["wv"][...], 0), "wo": (layer["attention"]["wo"][...], 1),
        "w1": (layer["feed_forward"]["w1"][...], 0), "w3": (layer["feed_forward"]["w3"][...], 0),
        "w2": (layer["feed_forward"]["w2"][...], 1),
        "tok_embeddings": (model.state["tok_embeddings"][...], 0), "output": (model.state["output"][...], 1),
    }
    for name, (a, axis) in split.items():
        for shard in a.addressable_shards:
            want = list(a.shape)
            want[axis] //= tp
            assert list(shard.data.shape) == want, name
    norm = layer["attention_norm"]["weight"][...]
    assert all(s.data.shape == norm.shape for s in norm.addressable_shards)  # replicated
    cache = model.init_cache(8, 32)
    for s in cache[0].k.addressable_shards:
        assert s.data.shape == (8 // dp, 32, c.n_kv_heads // tp, c.head_dim)


@pytest.mark.slow
def test_smollm2_replicated_kv_heads(smollm2_dir):
    """SmolLM2 has 3 KV heads and 9 query heads: tp=3 splits them; tp=9 needs each KV head repeated
    three times. Both generate the single-device greedy tokens."""
    single = llama_jax.load(smollm2_dir, dtype="float32")
    prompt = [single.tokenizer.encode("The capital of France is")]
    want = single.generate(prompt, max_new_tokens=8, stop_token_ids=[])[0].token_ids
    for tp, r in [(3, 1), (9, 3)]:
        assert sharding.kv_replication(single.config, tp) == r
    mesh = jax.make_mesh((1, 3), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:3])
    model = llama_jax.load(smollm2_dir, dtype="float32", mesh=mesh)
    assert model.generate(prompt, max_new_tokens=8, stop_token_ids=[])[0].token_ids == want


def test_kv_replication_rule(tiny8):
    cfg = llama_jax.LlamaConfig.from_hf(tiny8)
    assert sharding.kv_replication(cfg, 8) == 1
    small = llama_jax.LlamaConfig(vocab_size=64, dim=48, n_layers=1, n_heads=8, n_kv_heads=2, ffn_dim=64)
    assert sharding.kv_replication(small, 4) == 2 and sharding.kv_replication(small, 8) == 4
    with pytest.raises(ValueError, match=r"tp=3 fits neither.*tp values that work: \[1, 2, 4, 8\]"):
        sharding.kv_replication(small, 3)


def test_replicated_kv_heads_give_the_same_logits(tmp_path):
    """A 2-KV-head model on tp=8: each KV head repeated 4 times, same logits as one device."""
    _, path = make_hf_model(tmp_path, "g4_sharded")  # 8 query heads, 2 KV heads
    ids = np.random.RandomState(0).randint(3, 211, (2, 20)).tolist()
    want = llama_jax.load(path, dtype="float32").logits(ids)
    model = llama_jax.load(path, dtype="float32", mesh=llama_jax.make_mesh(dp=1, tp=8))
    assert model.config.n_kv_heads == 8
    np.testing.assert_allclose(model.logits(ids), want, atol=1e-4 * np.abs(want).max(), rtol=0)


def test_bad_meshes(tiny8, tmp_path):
    with pytest.raises(ValueError, match="bigger than the 8 devices"):
        llama_jax.make_mesh(dp=4, tp=4)
    _, path = make_hf_model(tmp_path, "g3_scaled_headdim")  # 6 query heads, 2 KV heads
    with pytest.raises(ValueError, match="tp=4 fits neither"):
        llama_jax.load(path, mesh=llama_jax.make_mesh(dp=2, tp=4))
    model = llama_jax.load(tiny8, mesh=llama_jax.make_mesh(dp=4, tp=2))
    with pytest.raises(ValueError, match="batch of 3 is not divisible by the mesh's data axis"):
        model.generate([[5], [6], [7]], max_new_tokens=2)


# --- Two processes ----------------------------------------------------------------------------------

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes(tiny8, reference):
    """Two processes on localhost, 4 CPU devices each, one (2, 4) mesh over all 8: the greedy tokens
    of one process on one device."""
    _, _, ref_tokens = reference
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = [subprocess.Popen([sys.executable, WORKER, str(tiny8), str(port), str(i), json.dumps(ragged8())],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    start = time.time()
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-2000:]
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    assert time.time() - start < 240
    assert outs[0] == outs[1] == ref_tokens


def test_converted_checkpoint_onto_a_mesh(tiny8, reference, tmp_path):
    """From a converted (Orbax) checkpoint each device restores only its shard; same logits."""
    from checkpoints_tools.convert import convert

    ref_logits, ids, _ = reference
    dst = tmp_path / "conv"
    convert(str(tiny8), str(dst), dtype="float32", progress=False)
    model = llama_jax.load(dst, dtype="float32", mesh=llama_jax.make_mesh(dp=2, tp=4))
    wq = model.state["layers"][0]["attention"]["wq"][...]
    assert all(s.data.shape == (wq.shape[0] // 4, wq.shape[1]) for s in wq.addressable_shards)  # [out, in]
    np.testing.assert_allclose(model.logits(ids), ref_logits, atol=1e-4 * np.abs(ref_logits).max(), rtol=0)
