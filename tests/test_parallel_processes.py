"""Training across two processes (issue #14): 2 processes x 4 fake CPU devices over gloo, one
dp2 x fsdp2 x tp2 mesh, each process feeding only its own rows, a checkpoint saved and resumed by
both; against the same run in this one process on 8 devices (tests/conftest.py)."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import llama_jax
from multiprocess_train_worker import MESH, train

pytestmark = pytest.mark.slow  # three processes compiling the same training step

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_train_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two_processes(tmp_path) -> list[subprocess.Popen]:
    """The two workers, checkpointing into tmp_path/two; their output goes to files (nobody reads a
    pipe while this process trains)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    procs = []
    for i in range(2):
        with open(tmp_path / f"out{i}", "w") as out, open(tmp_path / f"err{i}", "w") as err:
            procs.append(subprocess.Popen([sys.executable, WORKER, str(tmp_path / "two"), str(port), str(i)],
                                          stdout=out, stderr=err, env=env))
    return procs


def _results(procs: list[subprocess.Popen], tmp_path) -> list[dict]:
    outs = []
    try:
        for i, p in enumerate(procs):
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                errs = "\n".join(f"process {j}:\n{(tmp_path / f'err{j}').read_text()[-2000:]}" for j in range(2))
                raise AssertionError(f"process {i} did not finish in 600 s\n{errs}") from None
            err = (tmp_path / f"err{i}").read_text()
            assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
            outs.append(json.loads((tmp_path / f"out{i}").read_text().strip().splitlines()[-1]))
    finally:
        for p in procs:
            p.kill()
    return outs


def _assert_same(ours: dict, ref: dict, what: str):
    np.testing.assert_allclose(ours["losses"], ref["losses"], rtol=1e-5, atol=0, err_msg=f"{what}: losses")
    assert ours["step"] == ref["step"] == 3, (what, ours["step"], ref["step"])
    assert ours["checksums"].keys() == ref["checksums"].keys()
    errs = {n: np.abs(np.subtract(ours["checksums"][n], ref["checksums"][n])) / np.abs(ref["checksums"][n])
            for n in ref["checksums"]}
    worst = max(errs, key=lambda n: errs[n].max())
    assert errs[worst].max() <= 1e-5, f"{what}: weights {worst} (sum |w|, sum w^2) off by {errs[worst]} relative"


def test_two_processes_train_like_one(tmp_path):
    """2 steps, save, a new Trainer resumed from the checkpoint, 1 more step: the same losses and
    final weights in both processes as in one process on the same mesh shape."""
    procs = _start_two_processes(tmp_path)
    try:  # the one-process run meanwhile (mostly compiling, as are they)
        ref = train(llama_jax.make_mesh(**MESH), str(tmp_path / "one"))
    except BaseException:
        for p in procs:
            p.kill()
        raise
    outs = _results(procs, tmp_path)
    assert [o["part"] for o in outs] == [[0, 4], [4, 8]]  # each process its own half of each batch
    assert ref["part"] == [0, 8]
    for i, out in enumerate(outs):
        _assert_same(out, ref, f"process {i}")
    assert outs[0]["losses"] == outs[1]["losses"] and outs[0]["checksums"] == outs[1]["checksums"]
    assert len(set(ref["losses"])) == 3  # the steps saw different data and moved the weights
