"""Mosaic GPU kernels run in the interpreter, for test_mosaic_*.py.

The interpreter runs each CTA's three warpgroups as threads whose barrier waits block inside XLA's
CPU executor; XLA sizes that pool by the cores (2 in CI), so two waiting warpgroups starve the third
and the kernel deadlocks. XLA reads the pool size from NPROC when its CPU backend starts, and in
`make test` another module has started it long before, so a test module runs its kernels in one
child process (the module itself, run as a script) started with NPROC set: the child saves each
case's outputs with `save`, the tests read them with `outputs`.
"""

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest


class Results(NamedTuple):
    out_dir: Path
    logs: dict  # case name -> the child's stdout lines while it ran that case
    proc: subprocess.CompletedProcess


def run_child(test_file: str, out_dir: Path) -> Results:
    """Runs `python test_file out_dir` with NPROC set; its stdout split by the 'CASE NAME' lines."""
    env = dict(os.environ, NPROC="16", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, test_file, str(out_dir)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=Path(test_file).parent)
    logs, case = {}, None
    for line in proc.stdout.splitlines():
        if line.startswith("CASE "):
            case = line[5:]
        logs.setdefault(case, []).append(line)
    return Results(out_dir, logs, proc)


def start_case(name: str) -> int:
    """The child, before a case: a fresh seed, printed with the case's name (a race report and a
    rerun are put to their case by it)."""
    seed = int.from_bytes(os.urandom(4), "little") % 2**31
    print(f"CASE {name}\nseed {seed}", flush=True)
    return seed


def save(out_dir: Path, name: str, got, want) -> None:
    """The child, after a case: the kernel's outputs as got0, got1 ... and the reference's as want0 ..."""
    np.savez(out_dir / f"{name}.npz", **{f"got{i}": np.asarray(a, np.float32) for i, a in enumerate(got)},
             **{f"want{i}": np.asarray(a, np.float32) for i, a in enumerate(want)})
    print(f"DONE {name}", flush=True)


def outputs(results: Results, case: str):
    """A case's saved outputs; fails the test on a race report or when the child did not finish it."""
    log = "\n".join(results.logs.get(case, []))
    assert "RACE DETECTED" not in log, log[-3000:]
    path = results.out_dir / f"{case}.npz"
    if not path.exists():
        pytest.fail(f"the interpreter did not finish {case} (exit {results.proc.returncode}):\n"
                    f"{log[-2000:]}\n{results.proc.stderr[-4000:]}")
    return np.load(path)
