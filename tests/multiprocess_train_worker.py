"""One of two processes of test_parallel_processes.test_two_processes_train_like_one: 4 CPU devices
each, one dp2 x fsdp2 x tp2 mesh over all 8. Trains 2 steps, saves, resumes into a new Trainer and
trains 1 more, each process feeding only its own rows of each batch.

argv: checkpoint_dir port process_id. Prints {"losses", "step", "part", "checksums"} as JSON on its
last line. `train` is also what the test runs in one process, so both sides do exactly the same."""

import json
import sys

import numpy as np

MESH = dict(dp=2, fsdp=2, tp=2)  # make_mesh arguments


def packed_rows():
    """Packed rows of random documents (more rows than one batch, so the shuffle matters)."""
    from llama_jax.data import PackedRows
    from test_parallel import T

    rng = np.random.default_rng(7)
    docs = [[1, *rng.integers(3, 256, n).tolist(), 2] for n in rng.integers(3, 40, 40)]
    starts = np.cumsum([0] + [len(d) for d in docs])
    return PackedRows(np.concatenate(docs), starts, T)


def checksums(params) -> dict:
    """Per parameter: float64 (sum |w|, sum w^2) of its global value, gathered from all processes."""
    import jax
    from jax.experimental import multihost_utils

    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        w = np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float64)
        out[jax.tree_util.keystr(path)] = [float(np.abs(w).sum()), float((w * w).sum())]
    return out


def train(mesh, checkpoint_dir: str) -> dict:
    import llama_jax
    from llama_jax.data import Batches
    from llama_jax.train import Trainer
    from test_parallel import B, CONFIG, TRAIN

    rows = packed_rows()
    trainer = Trainer(llama_jax.from_config(CONFIG, seed=3, mesh=mesh), TRAIN)
    part = trainer.process_rows(B)
    batches = Batches(rows, B, seed=1, part=part)
    losses = [trainer.step(next(batches))["loss"] for _ in range(2)]
    trainer.save(checkpoint_dir, data_state=batches.state())
    # Another seed: the resumed weights must come from the checkpoint, not from the initialization.
    resumed = Trainer(llama_jax.from_config(CONFIG, seed=4, mesh=mesh), TRAIN, resume_from=checkpoint_dir)
    batches = Batches(rows, B, **resumed.data_state, part=resumed.process_rows(B))
    losses.append(resumed.step(next(batches))["loss"])
    return {"losses": losses, "step": resumed.step_count, "part": list(part), "checksums": checksums(resumed.params)}


if __name__ == "__main__":
    import jax

    checkpoint_dir, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    try:
        import llama_jax

        assert jax.device_count() == 8 and jax.local_device_count() == 4
        result = train(llama_jax.make_mesh(**MESH), checkpoint_dir)
        print(json.dumps(result), flush=True)
    finally:
        jax.distributed.shutdown()
