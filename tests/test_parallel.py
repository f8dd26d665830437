"""Every parallelism of Llama 3 against one device: the training step (loss, gradients, and weights
after three AdamW steps) on data, FSDP, tensor, context and pipeline meshes of 8 fake CPU devices,
the memory of the sharded train state, and bad meshes.

One tiny random model and one batch shape throughout, so the file compiles one program per mesh."""

import dataclasses

import jax
import numpy as np
import pytest

import llama_jax
from llama_jax import LlamaConfig, context_parallel, sharding
from llama_jax.checkpoint import to_hf_state_dict
from llama_jax.train import Trainer, TrainConfig, pack_documents

# 4 layers (2 stages), 8 query and 2 KV heads (tp=2), every split dimension even.
CONFIG = LlamaConfig(vocab_size=256, dim=64, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=96, head_dim=8,
                     max_seq_len=128, rope_theta=10000.0, bos_id=1, eos_ids=(2,))
# XLA's products on one device too (cpu_kernels off): the sharded runs are compared with the same code,
# so what differs is only the order of the reductions the mesh splits.
RUNTIME = llama_jax.RuntimeConfig(param_dtype="float32", dtype="float32", cpu_kernels="off")
B, T = 8, 32  # T divisible by 2 x cp for cp up to 4
TRAIN = TrainConfig(seq_len=T, batch_size=B, peak_lr=1e-2, warmup_steps=1, total_steps=6, min_lr_ratio=0.1,
                    weight_decay=0.1, grad_clip=1.0, scan_layers=True)
MESHES = {  # name -> make_mesh arguments
    "dp8": dict(dp=8, tp=1),
    "fsdp4_tp2": dict(fsdp=4, tp=2),
    "cp4_tp2": dict(cp=4, tp=2),
    "pp2_dp4": dict(pp=2, dp=4, tp=1),
    "pp2_cp2_tp2": dict(pp=2, cp=2, tp=2),
}


def _batches():
    """Three packed batches: several documents per row, crossing the context-parallel chunks."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        docs = [[1, *rng.integers(3, 256, n).tolist(), 2] for n in rng.integers(3, 40, 14)]
        rows = pack_documents(docs, T)
        rows = {k: np.resize(v, (B, T)) for k, v in rows.items()}  # exactly B rows
        out.append(rows)
    return out


def _trainer(mesh=None):
    return Trainer(llama_jax.from_config(CONFIG, RUNTIME, seed=3, mesh=mesh), TRAIN)


def _hf(tree):
    return {k: np.asarray(v) for k, v in to_hf_state_dict(tree, CONFIG).items()}


def _assert_close(ours: dict, ref: dict, rtol: float, what: str):
    errs = {n: np.abs(ours[n] - ref[n]).max() / max(np.abs(ref[n]).max(), 1e-30) for n in ref}
    worst = max(errs, key=errs.get)
    assert not any(np.isnan(ours[n]).any() for n in ours), f"{what}: NaN"
    assert errs[worst] <= rtol, f"{what}: {worst} off by {errs[worst]:.2e} of its scale"


@pytest.fixture(scope="module")
def reference():
    """The single-device run: the first batch's loss and gradients, then the weights after 3 steps."""
    trainer = _trainer()
    batches = _batches()
    loss, grads = trainer.loss_and_grads(batches[0])
    losses = [trainer.step(b)["loss"] for b in batches]
    return loss, _hf(grads), losses, _hf(trainer.params)


# make test runs the meshes that combine axes; dp8 and pp2_dp4 (each axis also in another) run in
# make test-slow.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("dp8", "pp2_dp4") else n
                                  for n in MESHES])
def test_training_step_equals_single_device(name, reference):
    loss_1, grads_1, losses_1, params_1 = reference
    trainer = _trainer(llama_jax.make_mesh(**MESHES[name]))
    batches = _batches()
    loss, grads = trainer.loss_and_grads(batches[0])
    assert abs(loss - loss_1) <= 1e-5 * loss_1, (loss, loss_1)
    _assert_close(_hf(grads), grads_1, 1e-5, f"{name} gradients")
    losses = [trainer.step(b)["loss"] for b in batches]
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    # 2e-5: the same XLA code on both sides, reductions split in another order; AdamW divides each
    # gradient by its own running scale, so a weight whose gradient is near zero moves by about lr
    # whatever its sign, and last-bit differences grow over 3 steps. A wrong reduction or sharding is
    # off by orders more.
    _assert_close(_hf(trainer.params), params_1, 2e-5, f"{name} weights after 3 steps")


def _state_bytes_per_device(trainer) -> int:
    """Bytes of the weights and optimizer state on the busiest device, read from the shardings."""
    per_device = {}
    for a in jax.tree.leaves((trainer.params, trainer.opt_state)):
        for shard in a.addressable_shards:
            d = shard.device
            per_device[d] = per_device.get(d, 0) + shard.data.nbytes
    return max(per_device.values())


def test_fsdp_state_bytes_per_device():
    """fsdp4 x tp2: the train state is split 8 ways (exactly, but for the scalars and the tiny norms),
    so the busiest device holds at most 1/6 of the single-device bytes."""
    single = _state_bytes_per_device(_trainer())
    sharded = _trainer(llama_jax.make_mesh(fsdp=4, tp=2))
    spec = sharded.params["layers"]["attention"]["wq"].sharding.spec
    assert spec[1:] == ("fsdp", "model"), spec  # [L, D, H*E]: D over fsdp, H*E over model
    per_device = _state_bytes_per_device(sharded)
    assert per_device <= single / 6, (per_device, single)


def test_bad_meshes():
    with pytest.raises(ValueError, match="16 devices is bigger than the 8 devices"):
        llama_jax.make_mesh(dp=4, fsdp=2, tp=2)
    with pytest.raises(ValueError, match="cp=3"):
        llama_jax.make_mesh(cp=3)
    with pytest.raises(ValueError, match="positive integer"):
        llama_jax.make_mesh(fsdp=0)


# --- Context-parallel prefill -----------------------------------------------------------------------

INFER = dataclasses.replace(RUNTIME, prefill_chunk=16)  # prompts span several chunks: cached prefixes
PROMPTS = [[1, *range(10, 47)], [1, *range(60, 80)], [1, 5, 6, 7, 8, 9, 10, 11], [1, *range(100, 150)]]


@pytest.fixture(scope="module")
def single():
    return llama_jax.from_config(CONFIG, INFER, seed=5)


def _packed_row():
    """One row of three documents, positions restarting at each."""
    docs = [[1, *range(30, 41), 2], [1, *range(90, 99), 2], [1, *range(200, 207)]]
    rows = pack_documents(docs, T)
    return {k: np.asarray(v[:1]) for k, v in rows.items()}


def _hidden_logits(llama, row):
    model = llama.model
    with sharding.on_mesh(llama.mesh):
        fn = jax.jit(lambda t, p, s: model.head(context_parallel.hidden(model, t, p, segment_ids=s)[0]))
        return np.asarray(fn(row["tokens"], row["positions"], row["segment_ids"]))


@pytest.mark.parametrize("mesh", [pytest.param(dict(cp=4, tp=1), marks=pytest.mark.slow), dict(cp=2, tp=2)],
                         ids=["cp4", "cp2_tp2"])
def test_context_parallel_prefill_equals_single_device(mesh, single):
    llama = llama_jax.from_config(CONFIG, INFER, seed=5, mesh=llama_jax.make_mesh(**mesh))
    # A packed row of several documents (segment ids, positions restarting), no cache.
    row = _packed_row()
    ref = _hidden_logits(single, row)
    np.testing.assert_allclose(_hidden_logits(llama, row), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # Full-sequence logits of equal-length rows.
    ids = [p[:T] for p in (PROMPTS[0], PROMPTS[3])]
    ref = single.logits(ids)
    np.testing.assert_allclose(llama.logits(ids), ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    # A ragged batch through chunked prefill (several chunks per prompt) and greedy decode.
    out = [c.token_ids for c in llama.generate(PROMPTS, max_new_tokens=8, stop_token_ids=[])]
    assert out == [c.token_ids for c in single.generate(PROMPTS, max_new_tokens=8, stop_token_ids=[])]


def test_context_parallel_bad_length():
    trainer = _trainer(llama_jax.make_mesh(cp=4, tp=1))
    batch = {"tokens": np.ones((B, 28), np.int32)}
    with pytest.raises(ValueError, match=r"multiple of 2 x cp = 8 \(e\.g\. 32\)"):
        trainer.step(batch)


def test_pipeline_bad_configs():
    with pytest.raises(ValueError, match="layers"):  # 4 layers over 3 stages
        Trainer(llama_jax.from_config(CONFIG, RUNTIME, mesh=llama_jax.make_mesh(pp=3, tp=1)), TRAIN)
    with pytest.raises(ValueError, match="micro"):  # fewer micro-batches than stages
        Trainer(llama_jax.from_config(CONFIG, RUNTIME, mesh=llama_jax.make_mesh(pp=4, tp=1)),
                dataclasses.replace(TRAIN, micro_batches=2))
