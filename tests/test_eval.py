"""Perplexity (llama_jax.eval) against transformers on tiny random Llamas, and `llama-jax eval`."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

import llama_jax
from llama_jax.eval import add_eval_command, cmd_eval, perplexity, windows

from tiny_models import make_hf_model


def _reference(model, stream, seq_len):
    """transformers' perplexity over the same windows: the mean of `labels=` losses, each window's
    loss weighted by its T - 1 targets."""
    total, count = 0.0, 0
    for w in windows(np.asarray(stream), seq_len):
        with torch.no_grad():
            loss = model(torch.tensor(w[None], dtype=torch.long), labels=torch.tensor(w[None], dtype=torch.long)).loss
        total += float(loss) * (len(w) - 1)
        count += len(w) - 1
    return total / count, count


@pytest.fixture(scope="module", params=["g1_tied", "g4_sharded"])
def tiny(request, tmp_path_factory):
    model, path = make_hf_model(tmp_path_factory.mktemp("hf"), request.param)
    return model, llama_jax.load(path, dtype="float32")


def test_perplexity_matches_transformers(tiny):
    hf, llm = tiny
    rng = np.random.default_rng(0)
    texts = [rng.integers(0, 211, n).tolist() for n in (40, 7, 30)]  # 77 tokens: 4 windows of 24, the last 5
    got = perplexity(llm, texts, seq_len=24, batch_size=3)  # the second batch is partial, its last window short
    nll, count = _reference(hf, np.concatenate(texts), 24)
    assert got["tokens"] == count == 3 * 23 + 4 and got["windows"] == 4
    assert got["nll"] == pytest.approx(nll, rel=1e-5, abs=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert perplexity(llm, texts, seq_len=24, batch_size=1)["nll"] == pytest.approx(got["nll"], rel=1e-6)


def test_perplexity_refuses_what_it_cannot_measure(tiny):
    _, llm = tiny
    with pytest.raises(ValueError, match="fewer than 2 tokens"):
        perplexity(llm, [[5]], seq_len=8)
    with pytest.raises(ValueError, match="token id 211 is outside"):
        perplexity(llm, [[1, 211]], seq_len=8)
    with pytest.raises(ValueError, match="past the model's context"):
        perplexity(llm, [[1, 2]], seq_len=4096)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        perplexity(llm, ["text"], seq_len=8)


def test_windows_drop_a_lone_last_token():
    assert [len(w) for w in windows(np.arange(17), 8)] == [8, 8]
    assert [len(w) for w in windows(np.arange(18), 8)] == [8, 8, 2]


# --- llama-jax eval -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """The kv8 tiny model (vocabulary 256) with a byte-level tokenizer.json: one id per byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf, path = make_hf_model(tmp_path_factory.mktemp("hf"), "kv8")
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    return hf, path, tok


def _eval(argv):
    sub = argparse.ArgumentParser().add_subparsers()
    add_eval_command(sub)
    return sub.choices["eval"].parse_args(argv)


def test_cli_eval_prints_json(byte_model, tmp_path, capsys):
    hf, path, tok = byte_model
    text = "The quick brown fox jumps over the lazy dog. " * 3
    data = tmp_path / "corpus.txt"
    data.write_text(text, encoding="utf-8")
    assert cmd_eval(_eval(["--model", str(path), "--data", str(data), "--seq-len", "32"])) == 0
    out = json.loads(capsys.readouterr().out)
    nll, count = _reference(hf, tok.encode(text).ids, 32)
    assert out["tokens"] == count and out["seq_len"] == 32
    assert out["nll"] == pytest.approx(nll, rel=1e-5) and out["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_cli_eval_errors_are_one_line(byte_model, tmp_path):
    from llama_jax.cli import CliError

    _, path, _ = byte_model
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n", encoding="utf-8")
    binary = tmp_path / "bytes.txt"
    binary.write_bytes(b"\xff\xfe\x00abc")
    for data, message in [(tmp_path / "missing.txt", "no such file"), (empty, "empty"), (binary, "not UTF-8")]:
        with pytest.raises(CliError, match=message) as e:
            cmd_eval(_eval(["--model", str(path), "--data", str(data)]))
        assert e.value.code == 2 and "\n" not in str(e.value)


def test_cli_eval_quantize(byte_model, tmp_path, capsys):
    """--quantize int8 measures the quantized model: close to the float perplexity, not equal to it."""
    _, path, _ = byte_model
    data = tmp_path / "corpus.txt"
    data.write_text("Pack my box with five dozen liquor jugs. " * 4, encoding="utf-8")
    runs = {}
    for quantize in ([], ["--quantize", "int8"]):
        assert cmd_eval(_eval(["--model", str(path), "--data", str(data), "--seq-len", "48", *quantize])) == 0
        out = json.loads(capsys.readouterr().out)
        runs[out["quantize"]] = out["nll"]
    assert runs["int8"] != runs[None] and runs["int8"] == pytest.approx(runs[None], rel=0.02)
