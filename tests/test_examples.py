"""Every script in examples/ runs as a user would run it (all at once: each is mostly JAX start-up
and compilation), on the default model or, for conversion, on a tiny one."""

import pathlib
import subprocess
import sys

import pytest

from conftest import default_model_env
from tiny_models import make_hf_model

pytestmark = pytest.mark.slow  # every example as a subprocess, on the default model

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """script name -> CompletedProcess."""
    tmp = tmp_path_factory.mktemp("examples")
    _, tiny = make_hf_model(tmp, "g1_tied")
    env = default_model_env()
    argvs = {
        "generate.py": [],
        "chat.py": [],
        "convert_weights.py": [str(tiny), str(tmp / "converted")],
        "sharded_inference.py": [],  # sets its own 8 fake devices
        # A smoke run; `make finetune` runs it for minutes.
        "finetune.py": ["--steps", "4", "--seq-len", "64", "--batch-size", "2", "--eval-rows", "4",
                        "--max-new-tokens", "8"],
    }
    procs = {name: subprocess.Popen([sys.executable, str(ROOT / "examples" / name), *argv], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp)
             for name, argv in argvs.items()}
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"{name}:\n{stderr}"
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    out["converted"] = tmp / "converted"
    return out


def test_every_example_is_tested(runs):
    assert {p.name for p in (ROOT / "examples").glob("*.py")} <= set(runs)


def test_generate(runs):
    first, *sampled = runs["generate.py"].stdout.strip().splitlines()
    assert first.startswith("The capital of France is Paris"), first
    assert sum("finish_reason=" in line for line in sampled) == 2


def test_chat(runs):
    out = runs["chat.py"].stdout
    replies = [line for line in out.splitlines() if line.startswith("assistant: ")]
    assert len(replies) == 2 and "Paris" in replies[0] and replies[1].strip() != "assistant:", out


def test_convert_weights(runs):
    assert (runs["converted"] / "llama_config.json").is_file()
    assert "loaded" in runs["convert_weights.py"].stdout


def test_sharded_inference(runs):
    out = runs["sharded_inference.py"].stdout
    assert "8 devices; mesh {'data': 2, 'model': 3}" in out
    assert "The capital of France is' Paris" in out, out


def test_finetune(runs):
    out = runs["finetune.py"].stdout
    assert out.count("(down from") == 2, out  # full fine-tuning and LoRA
    size = next(line for line in out.splitlines() if line.startswith("adapter on disk:"))
    assert float(size.split(", ")[1].split("%")[0]) < 5, size  # rank 16 on every projection
    assert "The with statement" in out
