"""benchmarks/gpu_all.py without a GPU: --dry-run lists every step's command, a CPU backend is refused
(exit 2, one line), and the report lands as one section appended to the markdown file, atomically,
with everything before it unchanged. Fast: the steps here are tiny `python -c` commands."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_all  # noqa: E402


def test_dry_run_lists_every_step_command(capsys):
    assert gpu_all.main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == gpu_all.STEP_NAMES
    for line, step in zip(out, gpu_all.steps(False)):
        assert gpu_all.shown(step.argv) in line and line.startswith(f"{step.name}: python ")
    text = "\n".join(out)
    for needle in ("pytest -q -rfE tests/test_kernels.py tests/test_model_kernels.py", "benchmarks/kernels.py",
                   "gpu_all.py --roofline", "--tokens 131072 --config llama3.1-8b", "train.py --gpu",
                   "generate.py --dtype bfloat16", "prefill.py", "llama_jax.cli bench", "serve.py"):
        assert needle in text, needle

    assert gpu_all.main(["--dry-run", "--quick", "--only", "roofline", "train", "--timeout", "7"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["roofline: python benchmarks/gpu_all.py --roofline --quick  (timeout 7 s)",
                   "train: python benchmarks/train.py --gpu --batch 2 --seq 512 --steps 2  (timeout 7 s)"]


def test_refuses_without_a_gpu():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_all.py"), "--only", "kernels"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "not 'gpu'" in r.stderr


def test_write_report_appends_atomically(tmp_path):
    doc = tmp_path / "PERFORMANCE.md"
    doc.write_text((ROOT / "docs" / "PERFORMANCE.md").read_text())
    doc.chmod(0o640)
    base = doc.read_text()
    gpu_all.write_report(doc, base, "#### dev, 2030-01-01\n\nfirst\n")
    gpu_all.write_report(doc, base, "#### dev, 2030-01-01\n\nfirst\n\nsecond\n")  # rewritten, not repeated
    text = doc.read_text()
    assert text == base.rstrip("\n") + "\n\n#### dev, 2030-01-01\n\nfirst\n\nsecond\n"
    assert doc.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["PERFORMANCE.md"]  # no temporary file left


def test_a_failing_or_hanging_step_does_not_stop_the_rest(tmp_path, monkeypatch, capsys):
    py = sys.executable
    fake = [gpu_all.Step("table", [py, "-c", "print('| a | b |')"], 30, markdown=True),
            gpu_all.Step("broken", [py, "-c", "import sys; print('partial'); sys.exit('boom')"], 30),
            gpu_all.Step("hang", [py, "-c", "import time; time.sleep(60)"], 1),
            gpu_all.Step("plain", [py, "-c", "print('k  ms'); print('x  1.0')"], 30)]
    monkeypatch.setattr(gpu_all, "steps", lambda quick: fake)
    doc = tmp_path / "p.md"
    doc.write_text("# Perf\n\nkept\n")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    assert gpu_all.main(["--allow-cpu", "--out", str(doc)]) == 1
    text = doc.read_text()
    assert text.startswith("# Perf\n\nkept\n\n#### cpu x") and text.count("#### ") == 1
    header = text.splitlines()[4]
    assert ", jax " in header and ", jaxlib " in header and "`python benchmarks/gpu_all.py`" in header
    assert "**table**: `python -c " in text and ": ok, " in text and "\n| a | b |\n" in text
    assert "failed, exit 1" in text and "partial" in text and "boom" in text
    assert "**hang**" in text and "timed out after 1 s" in text
    assert "**plain**" in text and "```text\nk  ms\nx  1.0\n```" in text
    assert "2/4 steps ok" in capsys.readouterr().out


@pytest.mark.parametrize("kind, bw", [("NVIDIA H100 80GB HBM3", 3.35e12), ("NVIDIA H200", 4.8e12),
                                      ("NVIDIA H100 PCIe", 2.0e12), ("cpu", None)])
def test_published_bandwidth(kind, bw):
    assert gpu_all.spec_bandwidth(kind) == bw
