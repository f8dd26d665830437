"""The kernel benchmark runs end to end at tiny shapes (interpret mode) and prints its table."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_benchmark_kernels_tiny():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "kernels.py"), "--tiny", "--iters", "1"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("kernel") and "max err" in line for line in lines), result.stdout
    for kernel in ["flash fwd", "decode", "rms_norm", "rms_norm+res"]:
        ours = [line for line in lines if line.startswith(kernel + " ") and " ours " in line]
        assert ours, f"no row for {kernel}:\n{result.stdout}"
        assert "skipped" not in ours[0] and "nan" not in ours[0].lower(), ours[0]
