"""convert-weights: round trips against the source (HF and GGUF, transformers as the outside
reference), sharded restore, bounded memory, atomicity, and one-line errors for bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import llama_jax
from checkpoints_tools import convert as conv
from checkpoints_tools.synthetic import convert_in_subprocess, write_random_hf
from smollm2 import smollm2_gguf_path
from llama_jax import cli, orbax_io
from llama_jax.api import Llama, from_params
from llama_jax.checkpoint import read_hf_params
from llama_jax.config import LlamaConfig
from llama_jax.gguf_io import _reverse_permute

ROOT = Path(__file__).resolve().parents[1]
SEQ = 40


def converted_model(path, dtype=None) -> Llama:
    return llama_jax.load(path, dtype=dtype or orbax_io.stored_dtype(path))


def temps_beside(dst: Path) -> list[str]:
    return [n for n in os.listdir(dst.parent) if n.startswith(f".{dst.name}.")]


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
    """Tiny transformers checkpoints: untied GQA in 3+ shards, and Llama 3 rope scaling."""
    from tiny_models import make_hf_model

    root = tmp_path_factory.mktemp("convert_hf")
    _, sharded = make_hf_model(root, "g4_sharded", max_shard_size="60KB")
    _, scaled = make_hf_model(root, "g3_scaled_headdim")
    return {"sharded": sharded, "scaled": scaled}


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(3).randint(0, 211, (2, SEQ)).tolist()


# ---------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("name", ["sharded", "scaled"])
def test_hf_roundtrip_f32_is_exact(tiny_hf, ids, tmp_path, name):
    src = tiny_hf[name]
    assert name != "sharded" or len(list(src.glob("model-*.safetensors"))) >= 3
    dst = conv.convert(src, tmp_path / "out", dtype="float32", progress=False)
    assert orbax_io.is_converted(dst) and not orbax_io.is_converted(src)
    config, params = orbax_io.read_converted(dst)
    assert orbax_io.stored_dtype(dst) == "float32" and params["layers"]["attention"]["wq"].dtype == np.float32
    assert config == LlamaConfig.from_hf(src)
    ref_params = read_hf_params(src, config, np.float32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref_params)
    ours = from_params(config, params).logits(ids)
    ref = llama_jax.load(src, dtype="float32").logits(ids)
    err = np.abs(ours - ref)
    assert err.max() <= 1e-6, f"max err {err.max():.3g} mean {err.mean():.3g}"


@pytest.mark.slow  # the f32 round trips stay in make test
def test_hf_roundtrip_bf16(tiny_hf, ids, tmp_path):
    src = tiny_hf["sharded"]
    dst = conv.convert(src, tmp_path / "out", progress=False)  # bfloat16 by default
    stored = json.loads((dst_path := Path(dst) / orbax_io.CONFIG_FILE).read_text())
    # The stored dtype is the checkpoint's; nothing of how it runs (RuntimeConfig) is stored.
    assert stored["param_dtype"] == "bfloat16" and "attention_impl" not in stored, dst_path
    config, params = orbax_io.read_converted(dst)
    assert params["layers"]["attention"]["wq"].dtype == jax.numpy.bfloat16
    # Stored bf16 = the f32 source rounded once; restoring as f32 gives exactly those values.
    _, params32 = orbax_io.read_converted(dst, dtype="float32")
    ref_params = read_hf_params(src, config, np.float32)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(
        np.asarray(a), b.astype(jax.numpy.bfloat16).astype(np.float32)), params32, ref_params)
    # Same bf16 values, same bf16 compute: the converted model is the directly loaded one. (Against
    # f32, random tiny models differ by bf16 rounding whoever computes: test_model.py.)
    bf16 = llama_jax.RuntimeConfig(param_dtype="bfloat16", dtype="bfloat16")
    ours = from_params(config, params, bf16).logits(ids)
    ref = llama_jax.load(src, dtype="bfloat16").logits(ids)
    err, scale = np.abs(ours - ref), np.abs(ref).max()
    assert err.max() <= 1e-6 * scale, f"max err {err.max():.3g} mean {err.mean():.3g} scale {scale:.3g}"


def test_sharded_restore_reads_onto_the_mesh(tiny_hf, tmp_path):
    src = tiny_hf["sharded"]
    dst = conv.convert(src, tmp_path / "out", dtype="float32", progress=False)
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    config = orbax_io.read_config(dst)
    # Column-parallel on the last axis for 3-D weights, replicated elsewhere.
    ref = read_hf_params(src, config, np.float32)
    spec = lambda a: P(None, None, "model") if a.ndim == 3 else P()  # noqa: E731
    shardings = jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), ref)
    _, params = orbax_io.read_converted(dst, shardings=shardings)
    wq = params["layers"]["attention"]["wq"]
    assert wq.sharding == shardings["layers"]["attention"]["wq"]
    assert {s.data.shape for s in wq.addressable_shards} == {(wq.shape[0], wq.shape[1], wq.shape[2] // 4)}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, ref)
    with pytest.raises(ValueError, match="structure"):
        orbax_io.read_converted(dst, shardings={"tok_embeddings": shardings["tok_embeddings"]})


def test_force_replaces_only_after_success(tiny_hf, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old").write_text("x")
    with pytest.raises(conv.UsageError, match="already exists"):
        conv.convert(tiny_hf["scaled"], dst, progress=False)
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match="config.json"):
        conv.convert(bad, dst, force=True, progress=False)
    assert (dst / "old").exists() and temps_beside(dst) == []  # a failed --force keeps the old one
    conv.convert(tiny_hf["scaled"], dst, force=True, progress=False)
    assert orbax_io.is_converted(dst) and not (dst / "old").exists() and temps_beside(dst) == []


def test_write_error_midway_leaves_nothing(tiny_hf, tmp_path, monkeypatch, capsys):
    calls = []
    real = orbax_io.write_tensor

    async def failing(store, layer, a):
        calls.append(layer)
        if len(calls) > 1:
            raise OSError(28, "No space left on device", str(tmp_path / "out"))
        await real(store, layer, a)

    monkeypatch.setattr(orbax_io, "write_tensor", failing)
    dst = tmp_path / "out"
    assert conv.main([str(tiny_hf["sharded"]), str(dst)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0], err
    assert len(calls) == 2 and not dst.exists() and temps_beside(dst) == []


def test_cli_convert_and_inspect(tiny_hf, tmp_path, capsys):
    dst = tmp_path / "out"
    assert cli.main(["convert", str(tiny_hf["scaled"]), str(dst), "--dtype", "float32"]) == 0
    assert "converted" in capsys.readouterr().out
    assert cli.main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    config = orbax_io.read_config(dst)
    n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(read_hf_params(tiny_hf["scaled"], config, np.float32)))
    assert f"parameters: {n:,}" in out and "dtype: float32" in out and '"n_layers": 3' in out
    assert cli.main(["inspect", str(tiny_hf["scaled"])]) == 2
    assert "not a converted checkpoint" in capsys.readouterr().err


def test_reverse_permute_undoes_llama_cpp():
    # llama.cpp's convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy.
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.RandomState(0).randn(3 * 8, 5).astype(np.float32)
    np.testing.assert_array_equal(_reverse_permute(permute(w, 3), 3), w)
    assert not np.array_equal(permute(w, 3), w)


# ---------------------------------------------------------------------------------------------
# SmolLM2's GGUF against transformers reading the same file


@pytest.fixture(scope="module")
def gguf_converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("gguf") / "smollm2"
    conv.convert(smollm2_gguf_path(), dst, dtype="float32", progress=False)
    return dst


@pytest.mark.slow
def test_gguf_config_and_tokenizer_files(gguf_converted, smollm2_dir):
    from llama_jax.chat import chat_format_for
    from llama_jax.tokenizer import load_tokenizer

    config = orbax_io.read_config(gguf_converted)
    assert config == LlamaConfig.from_hf(smollm2_dir)
    tok = load_tokenizer(gguf_converted)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, (2,), 49152)
    fmt = chat_format_for(gguf_converted, tok)
    ids = fmt.encode_dialog([{"role": "user", "content": "Hi"}])
    assert ids[:1] == [1] and tok.decode(ids).endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(gguf_converted):
    from test_tokenizer import CORPUS
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    ref = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = Tokenizer.from_file(str(gguf_converted / "tokenizer.json"))
    texts = CORPUS + ["<|im_start|>user\nHi <|im_end|>\n<|endoftext|>", " \n\t  x", "naïve café 東京 🙂"]
    for text in texts:
        want = ref(text)["input_ids"]
        got = ours.encode(text).ids
        assert got == want, f"{text[:60]!r}: {got[:12]} vs {want[:12]}"
        assert ours.decode(got, skip_special_tokens=False) == ref.decode(want)
    assert ours.get_vocab(with_added_tokens=True) == ref.get_vocab()


@pytest.mark.slow
def test_gguf_logits_match_transformers(gguf_converted, smollm2_hf_model):
    """smollm2_hf_model is transformers' own read of the same GGUF (AutoModelForCausalLM with
    gguf_file=..., fp32), saved once by conftest and shared across the test files."""
    import torch

    from llama_jax.tokenizer import load_tokenizer

    ids = load_tokenizer(gguf_converted).encode("The capital of France is")
    with torch.no_grad():
        ref = smollm2_hf_model(torch.tensor([ids])).logits.float().numpy()
    t = time.time()
    ours = converted_model(gguf_converted).logits([ids])
    print(f"read + build + logits: {time.time() - t:.1f} s")
    err = np.abs(ours - ref)
    assert err.max() <= 1e-3, f"max err {err.max():.3g} mean {err.mean():.3g}"
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.slow
def test_gguf_greedy_generation_matches_transformers(gguf_converted, smollm2_hf_model):
    import torch

    model = llama_jax.load(gguf_converted)
    ids = model.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        ref = smollm2_hf_model.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                        eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    out = model.generate([ids], max_new_tokens=16, stop_token_ids=[])[0]
    assert out.token_ids == ref
    assert out.text.startswith(" Paris")


@pytest.mark.slow
def test_gguf_blocks_are_kept_byte_for_byte(gguf_converted):
    """The Q4_1 layers and the Q8_0 embedding are stored as int4 / int8 QArrays whose bytes are the
    GGUF's blocks (after the q/k row permutation, which moves whole blocks), a fifth of float32."""
    import gguf

    from llama_jax import quant

    specs = orbax_io.read_quantized(gguf_converted)
    assert specs[("tok_embeddings",)] == quant.QSpec("int8", 32, -1, "float16", False)
    assert specs[("layers", "feed_forward", "w2")] == quant.QSpec("int4", 32, -2, "float16", True)
    _, params = orbax_io.read_converted(gguf_converted)
    w2 = params["layers"]["feed_forward"]["w2"]
    t = next(t for t in gguf.GGUFReader(smollm2_gguf_path()).tensors if t.name == "blk.3.ffn_down.weight")
    blocks = quant.gguf_block_array(t.data, "Q4_1", tuple(reversed(t.shape.tolist())))
    kept = quant.transpose(jax.tree.map(lambda a: np.asarray(a)[3], w2))  # layer 3, GGUF's [out, in]
    np.testing.assert_array_equal(np.asarray(kept.values).reshape(blocks.shape[0], -1, 16), blocks[..., 4:])
    np.testing.assert_array_equal(np.asarray(kept.scales), blocks[..., :2].copy().view(np.float16)[..., 0])
    size = sum(f.stat().st_size for f in gguf_converted.rglob("*") if f.is_file())
    assert size < 0.21 * 4 * 134.5e6, size


@pytest.mark.parametrize("fmt", [pytest.param("int8", marks=pytest.mark.slow), "int4",
                                 pytest.param("fp8", marks=pytest.mark.slow)])
def test_convert_quantize_stores_what_load_quantizes(tiny_hf, ids, tmp_path, fmt):
    """convert --quantize (a layer at a time, as it streams) stores the weights load(quantize=)
    makes from the float checkpoint (the whole stack at once): the same logits, and a checkpoint
    that loads quantized with no flag."""
    from llama_jax import quant

    src = tiny_hf["sharded"]
    dst = conv.convert(src, tmp_path / "q", dtype="float32", quantize=fmt, progress=False)
    assert {s.format for s in orbax_io.read_quantized(dst).values()} == {fmt, quant.TABLE_FORMAT[fmt]}
    stored = llama_jax.load(dst, dtype="float32", cpu_kernels="off")
    assert isinstance(stored.params["layers"]["attention"]["wq"], quant.QArray)
    at_load = llama_jax.load(src, dtype="float32", quantize=fmt, cpu_kernels="off")
    np.testing.assert_array_equal(stored.logits(ids), at_load.logits(ids))


@pytest.mark.slow
def test_quantized_checkpoint_on_a_tensor_parallel_mesh(tiny_hf, ids, tmp_path):
    """Each device reads its shard of a quantized weight's parts (scales with their rows) and the
    sharded model computes the single-device logits; greedy tokens agree too."""
    dst = conv.convert(tiny_hf["sharded"], tmp_path / "q", dtype="float32", quantize="int4", progress=False)
    alone = llama_jax.load(dst, cpu_kernels="off")
    sharded = llama_jax.load(dst, mesh=llama_jax.make_mesh(tp=2), cpu_kernels="off")
    w1 = sharded.state["layers"][0]["feed_forward"]["w1"].get_value()  # [out, in], out split
    assert {s.data.shape[0] for s in w1.scales.addressable_shards} == {w1.shape[0] // 2}
    want = alone.logits(ids)
    np.testing.assert_allclose(sharded.logits(ids), want, atol=1e-5 * np.abs(want).max(), rtol=0)
    prompts = [ids[0][:5], ids[1][:7]]
    assert ([c.token_ids for c in sharded.generate(prompts, max_new_tokens=6)]
            == [c.token_ids for c in alone.generate(prompts, max_new_tokens=6)])


# ---------------------------------------------------------------------------------------------
# Memory and kills, on a generated 8-shard model


BIG = LlamaConfig(vocab_size=8192, dim=1024, n_layers=6, n_heads=8, n_kv_heads=2, ffn_dim=2816, bos_id=1,
                  eos_ids=(2,))
LARGEST_TENSOR = 8192 * 1024 * 4  # the f32 embedding and head
MEMORY_BOUND = 3 * LARGEST_TENSOR + 48 * 2**20  # above the interpreter + JAX + Orbax baseline


@pytest.fixture(scope="module")
def big_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "hf"
    size = write_random_hf(path, BIG)
    assert size >= 300e6 and len(list(path.glob("*.safetensors"))) >= 6
    return path, size


@pytest.mark.slow
def test_peak_memory_is_bounded(big_hf, tmp_path):
    """Peak RSS of a conversion minus that of a tiny conversion, measured the same way, stays
    within ~3 largest tensors, far under the model's size."""
    src, size = big_hf
    tiny = LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    write_random_hf(tmp_path / "tiny", tiny)
    base = convert_in_subprocess(tmp_path / "tiny", tmp_path / "tiny_out")["peak_rss"]
    run = convert_in_subprocess(src, tmp_path / "out", dtype="bfloat16")
    extra = run["peak_rss"] - base
    print(f"model {size / 1e6:.0f} MB: peak RSS {run['peak_rss'] / 1e6:.0f} MB, baseline {base / 1e6:.0f} MB, "
          f"extra {extra / 1e6:.0f} MB (bound {MEMORY_BOUND / 1e6:.0f} MB), {run['seconds']:.1f} s")
    assert extra <= MEMORY_BOUND < size / 2
    config, params = orbax_io.read_converted(tmp_path / "out")
    assert config.n_layers == BIG.n_layers and params["layers"]["feed_forward"]["w2"].shape == (6, 2816, 1024)


@pytest.mark.slow
def test_sigkill_leaves_no_dst_and_next_run_cleans_up(big_hf, tmp_path):
    src, _ = big_hf
    dst = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen([sys.executable, "-m", "checkpoints_tools.convert", str(src), str(dst)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not temps_beside(dst) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        assert temps_beside(dst), "the converter never made its temp dir"
        time.sleep(0.5)  # mid-way through the tensors
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not dst.exists()
    stale = temps_beside(dst)
    assert stale == [f".out.convert-{proc.pid}.tmp"]  # recognizable: the dead converter's PID
    assert conv.clean_stale_temps(str(dst)) == [str(tmp_path / stale[0])]
    assert temps_beside(dst) == []


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: a non-zero exit, one line on stderr naming the culprit, nothing left


def _make_bad_cases(root: Path, tiny_src: Path) -> dict[str, tuple[list[str], str, int]]:
    """name -> (argv, text the error must contain, exit code)."""
    from safetensors.numpy import load_file, save_file

    def copy(name):
        shutil.copytree(tiny_src, root / name)
        return root / name

    shards = sorted(p.name for p in tiny_src.glob("model-*.safetensors"))
    index = json.loads((tiny_src / "model.safetensors.index.json").read_text())
    cases = {}

    d = copy("no_config")
    (d / "config.json").unlink()
    cases["no_config"] = ([str(d)], "no config.json", 1)

    d = copy("other_arch")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="mistral")))
    cases["other_arch"] = ([str(d)], "unsupported model_type 'mistral'", 1)

    d = copy("missing_shard")
    (d / shards[1]).unlink()
    cases["missing_shard"] = ([str(d)], f"names shard '{shards[1]}', which is missing", 1)

    d = copy("truncated")
    with open(d / shards[1], "r+b") as f:
        f.truncate(os.path.getsize(d / shards[1]) // 2)
    cases["truncated"] = ([str(d)], f"{shards[1]}: truncated safetensors file", 1)

    d = copy("wrong_shape")
    (d / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=cfg["intermediate_size"] + 2)))
    cases["wrong_shape"] = ([str(d)], "has shape", 1)

    # A tensor gone from both its shard and the index; another added to both.
    victim = "model.layers.1.mlp.up_proj.weight"
    for name, edit in [("missing_tensor", lambda t: t.pop(victim)),
                       ("extra_tensor", lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3, np.float32)}))]:
        d = copy(name)
        shard = index["weight_map"][victim]
        tensors = load_file(d / shard)
        edit(tensors)
        save_file(tensors, d / shard)
        wm = {n: s for n, s in index["weight_map"].items() if n != victim or name != "missing_tensor"}
        wm.update({n: shard for n in tensors})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    cases["missing_tensor"] = ([str(root / "missing_tensor")], f"missing tensor '{victim}'", 1)
    cases["extra_tensor"] = ([str(root / "extra_tensor")], "unexpected tensor 'model.layers.0.extra.weight'", 1)

    d = root / "pickle"
    d.mkdir()
    shutil.copy(tiny_src / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cases["pickle"] = ([str(d)], "pytorch_model.bin", 1)

    gguf = root / "truncated.gguf"
    with open(smollm2_gguf_path(), "rb") as f:
        gguf.write_bytes(f.read(8 * 2**20))  # header and vocab intact, tensor data cut
    cases["truncated_gguf"] = ([str(gguf)], "truncated.gguf", 1)

    d = root / "exists"
    d.mkdir()
    cases["dst_exists"] = ([str(tiny_src), str(d)], "already exists", 2)
    cases["no_src"] = ([str(root / "nowhere")], "nowhere: no such file or directory", 2)
    cases["bad_dtype"] = ([str(tiny_src), "--dtype", "float16"], "invalid choice", 2)
    return cases


# Most run as `python -m checkpoints_tools.convert` subprocesses, all at once (each is mostly
# interpreter and JAX start-up); a few run in-process through the same `main`, to keep the file fast.
IN_PROCESS = {"missing_shard", "missing_tensor", "bad_dtype"}
BAD_CASES = ["no_config", "other_arch", "missing_shard", "truncated", "wrong_shape", "missing_tensor",
             "extra_tensor", "pickle", "truncated_gguf", "dst_exists", "no_src", "bad_dtype"]


def _argv(name, argv, root):
    """(argv for main with SRC DST, DST)."""
    if name == "dst_exists":
        return argv, Path(argv[1])
    dst = root / "out" / name
    return [argv[0], str(dst), *argv[1:]], dst


@pytest.fixture(scope="module")
def bad_runs(tiny_hf, tmp_path_factory):
    """name -> (case, DST, exit code, stderr); exit code and stderr None for in-process cases."""
    root = tmp_path_factory.mktemp("bad")
    (root / "out").mkdir()
    cases = _make_bad_cases(root, tiny_hf["sharded"])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    procs = {}
    for name, (argv, _, _) in cases.items():
        args, dst = _argv(name, argv, root)
        procs[name] = (dst, None if name in IN_PROCESS else subprocess.Popen(
            [sys.executable, "-m", "checkpoints_tools.convert", *args], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (dst, proc) in procs.items():
        if proc is None:
            results[name] = (cases[name], dst, None, None)
        else:
            _, err = proc.communicate(timeout=180)
            results[name] = (cases[name], dst, proc.returncode, err)
    return results


@pytest.mark.slow  # the cases run as subprocesses
@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_input_is_one_line_and_leaves_nothing(bad_runs, name, capsys):
    (argv, needle, code), dst, rc, err = bad_runs[name]
    if rc is None:
        args, _ = _argv(name, argv, dst.parent.parent)
        try:
            rc = conv.main(args)
        except SystemExit as e:  # argparse
            rc = e.code
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    if name != "bad_dtype":  # argparse prints its usage line first
        assert len(lines) == 1, err
    assert rc == code and needle in lines[-1], (rc, err)
    assert "Traceback" not in err
    if name == "dst_exists":
        assert list(dst.iterdir()) == []  # untouched
    else:
        assert not dst.exists()
    assert temps_beside(dst) == []


def test_allow_extra_accepts_an_extra_tensor(bad_runs, tmp_path):
    src = Path(bad_runs["extra_tensor"][0][0][0])
    dst = conv.convert(src, tmp_path / "out", allow_extra=True, progress=False)
    assert orbax_io.is_converted(dst)
