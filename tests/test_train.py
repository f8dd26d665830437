"""Training against PyTorch: transformers' loss, torch autograd's gradients, torch.optim.AdamW with a
LambdaLR warmup-cosine and clip_grad_norm_, step for step; packing, accumulation, remat; checkpoints
(resume bit for bit in a new process, a save killed midway), export, the command line, bad input.

Every trainer here uses one of three tiny models and batches of one shape, so the whole file compiles
a handful of programs (each a few seconds on 2 CPU cores)."""

import copy
import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import llama_jax
from conftest import ROOT, default_model_env
from llama_jax import cli
from llama_jax.checkpoint import to_hf_state_dict
from llama_jax.train import Trainer, TrainConfig, TrainingDiverged, pack_documents
from tiny_models import make_hf_model

B, T = 4, 24  # T past the scaled model's original context (16), so RoPE scaling is exercised
BASE = TrainConfig(seq_len=T, batch_size=B, peak_lr=1e-2, warmup_steps=2, total_steps=6, min_lr_ratio=0.1,
                   weight_decay=0.1, grad_clip=1.0)


def _batch(seed, vocab=211, b=B):
    return {"tokens": np.random.default_rng(seed).integers(0, vocab, (b, T))}


def _packed_batch():
    """Four rows of documents of different lengths (the last row mostly padding)."""
    rng = np.random.default_rng(7)
    docs = [rng.integers(3, 211, n).tolist() for n in (7, 11, 5, 13, 9, 4, 17, 6, 3, 10, 5)]
    rows = pack_documents(docs, T)
    assert len(rows["tokens"]) == 4, len(rows["tokens"])
    return docs, rows


def _assert_close(ours: dict, theirs: dict, rtol, what):
    """Tensor by tensor: max |ours - theirs| <= rtol * max |theirs|; prints the worst."""
    assert set(ours) == set(theirs), f"{what}: names differ: {set(ours) ^ set(theirs)}"
    errs = {n: np.abs(ours[n] - theirs[n]).max() / max(np.abs(theirs[n]).max(), 1e-30) for n in theirs}
    worst = max(errs, key=errs.get)
    mean = float(np.mean(list(errs.values())))
    assert errs[worst] <= rtol, f"{what}: {worst} off by {errs[worst]:.2e} of its scale (mean {mean:.2e})"


def torch_warmup_cosine(opt, c: TrainConfig):
    """The reference schedule: torch's LambdaLR with TrainConfig c's linear warmup and cosine decay."""
    def lam(s):
        if s < c.warmup_steps:
            return s / c.warmup_steps
        progress = min(1.0, (s - c.warmup_steps) / max(1, c.total_steps - c.warmup_steps))
        return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, lam)


def _torch_grads(hf):
    return {n: p.grad.detach().numpy().copy() for n, p in hf.named_parameters()}


# --- Loss and gradients -----------------------------------------------------------------------------


def test_loss_equals_transformers_labels_loss(untied):
    hf, _, llama = untied
    batch = _batch(0)
    loss, _ = Trainer(llama, BASE).loss_and_grads(batch)
    with torch.no_grad():
        want = hf(torch.tensor(batch["tokens"]), labels=torch.tensor(batch["tokens"])).loss.item()
    assert abs(loss - want) <= 1e-5 * want, (loss, want)


def test_packed_rows_loss_is_the_token_weighted_mean_of_each_documents_loss(untied):
    hf, _, llama = untied
    docs, rows = _packed_batch()
    loss, _ = Trainer(llama, BASE).loss_and_grads(rows)
    with torch.no_grad():
        per_doc = [hf(torch.tensor([d]), labels=torch.tensor([d])).loss.item() for d in docs]
    weights = [len(d) - 1 for d in docs]  # next-token targets inside each document
    want = float(np.dot(per_doc, weights) / np.sum(weights))
    assert abs(loss - want) <= 1e-5 * want, (loss, want)


@pytest.mark.parametrize("name", ["g3_scaled_headdim", "g1_tied"])
def test_gradients_equal_torch_autograd(models, name):
    hf, _, llama = models[name]
    hf = copy.deepcopy(hf)
    batch = _batch(1)
    _, grads = Trainer(llama, BASE).loss_and_grads(batch)
    hf.zero_grad()
    hf(torch.tensor(batch["tokens"]), labels=torch.tensor(batch["tokens"])).loss.backward()
    ours = to_hf_state_dict(grads, llama.config)
    assert ("lm_head.weight" in ours) == (not llama.config.tie_embeddings)
    _assert_close(ours, _torch_grads(hf), 1e-4, f"{name} gradients")


def test_grad_accumulation_equals_one_large_batch(untied):
    _, _, llama = untied
    _, rows = _packed_batch()  # rows with different numbers of targets: the mean must weight tokens
    big_loss, big = Trainer(llama, BASE).loss_and_grads(rows)
    acc_loss, acc = Trainer(llama, TrainConfig(**{**BASE.to_dict(), "grad_accum": 4, "batch_size": 1})
                            ).loss_and_grads(rows)
    assert abs(acc_loss - big_loss) <= 1e-6 * big_loss
    _assert_close(to_hf_state_dict(acc, llama.config), to_hf_state_dict(big, llama.config), 1e-5, "accumulated")


def test_remat_and_scanned_layers_give_the_same_gradients(untied):
    """Remat (recompute each layer in the backward) over the scanned stacked layers (the GPU default)
    against neither (the per-layer loop, the CPU default)."""
    _, _, llama = untied
    batch = _batch(2)
    loss, plain = Trainer(llama, TrainConfig(**{**BASE.to_dict(), "scan_layers": False})).loss_and_grads(batch)
    loss_r, remat = Trainer(llama, TrainConfig(**{**BASE.to_dict(), "remat": True, "scan_layers": True})
                            ).loss_and_grads(batch)
    assert abs(loss - loss_r) <= 1e-6 * loss
    _assert_close(to_hf_state_dict(remat, llama.config), to_hf_state_dict(plain, llama.config), 1e-5, "remat")


def test_sharded_gradients_equal_single_device(tmp_path):
    """Data and tensor parallel (a 2 x 2 mesh of this process's fake CPU devices): the same loss and
    gradients, laid out by the model's logical axes."""
    _, path = make_hf_model(tmp_path, "g4_sharded")
    batch = _batch(3)
    loss, grads = Trainer(llama_jax.load(path, dtype="float32"), BASE).loss_and_grads(batch)
    sharded = Trainer(llama_jax.load(path, dtype="float32", mesh=llama_jax.make_mesh(2, 2)), BASE)
    assert "model" in str(sharded.params["layers"]["attention"]["wq"].sharding.spec)
    loss_s, grads_s = sharded.loss_and_grads(batch)
    assert abs(loss_s - loss) <= 1e-5 * loss
    config = sharded.model_config
    _assert_close(to_hf_state_dict(grads_s, config), to_hf_state_dict(grads, config), 1e-5, "sharded gradients")


# --- Optimizer steps against torch ------------------------------------------------------------------


def _torch_train(hf, batches, c: TrainConfig):
    """transformers + torch.optim.AdamW (no decay on norms) + LambdaLR warmup-cosine + clip_grad_norm_."""
    model = copy.deepcopy(hf).train()
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": c.weight_decay},
                             {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}],
                            lr=c.peak_lr, betas=(c.b1, c.b2), eps=c.eps)

    sched = torch_warmup_cosine(opt, c)
    out = []
    for batch in batches:
        ids = torch.tensor(batch["tokens"])
        loss = model(ids, labels=ids).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        opt.zero_grad()
        out.append((loss.item(), norm.item(), lr))
    return model, out


def test_five_adamw_steps_equal_torch(untied):
    hf, _, llama = untied
    config = TrainConfig(**{**BASE.to_dict(), "total_steps": 5})
    batches = [_batch(10 + i) for i in range(5)]
    trainer = Trainer(llama, config)
    ours = [trainer.step(b) for b in batches]
    model, theirs = _torch_train(hf, batches, config)
    for i, (m, (loss, norm, lr)) in enumerate(zip(ours, theirs)):
        assert abs(m["loss"] - loss) <= 1e-5 * loss, (i, m, loss)
        assert abs(m["grad_norm"] - norm) <= 1e-5 * norm, (i, m, norm)
        assert abs(m["lr"] - lr) <= 1e-7 * config.peak_lr, (i, m, lr)
    assert max(m["grad_norm"] for m in ours) > config.grad_clip  # clipping was active
    want = {n: p.detach().numpy() for n, p in model.named_parameters()}
    _assert_close(to_hf_state_dict(trainer.params, llama.config), want, 1e-4, "weights after 5 steps")


# --- Checkpoints and export -------------------------------------------------------------------------


def _snapshot(path: pathlib.Path) -> dict:
    return {str(p.relative_to(path)): p.stat().st_mtime_ns for p in sorted(path.rglob("*"))}


def test_nan_loss_stops_keeping_the_last_good_checkpoint(untied, tmp_path):
    _, _, llama = untied
    trainer = Trainer(llama, BASE)
    trainer.step(_batch(20))
    trainer.save(tmp_path / "ckpt")
    before = _snapshot(tmp_path / "ckpt")
    good = {k: np.asarray(v) for k, v in to_hf_state_dict(trainer.params, llama.config).items()}
    params = trainer.params
    params["norm"]["weight"] = params["norm"]["weight"] * np.nan  # the run diverges
    trainer.params = params
    with pytest.raises(TrainingDiverged, match=r"step 2: the loss is nan.*weights are those after step 1"):
        trainer.step(_batch(21))
    assert trainer.step_count == 1
    assert _snapshot(tmp_path / "ckpt") == before
    resumed = Trainer(llama, BASE, resume_from=tmp_path / "ckpt")
    assert resumed.step_count == 1
    _assert_close(to_hf_state_dict(resumed.params, llama.config), good, 0.0, "restored")


def test_resume_refuses_another_model_or_config(models, tmp_path):
    _, _, llama = models["g3_scaled_headdim"]
    Trainer(llama, BASE).save(tmp_path / "ckpt")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="another TrainConfig.*peak_lr"):
        Trainer(llama, TrainConfig(**{**BASE.to_dict(), "peak_lr": 1e-3}), resume_from=tmp_path / "ckpt")
    other = models["g1_tied"][2]
    with pytest.raises(ValueError, match="another model"):
        Trainer(other, BASE, resume_from=tmp_path / "ckpt")
    with pytest.raises(ValueError, match="another model"):
        Trainer(other, BASE).save(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        Trainer(llama, BASE, resume_from=tmp_path / "nowhere")
    assert _snapshot(tmp_path) == before


def test_bad_train_configs():
    for kw, needle in [({"peak_lr": 0.0}, "peak_lr must be a positive"), ({"peak_lr": -1e-3}, "peak_lr"),
                       ({"warmup_steps": 11, "total_steps": 10}, "warmup_steps"), ({"remat": "bogus"}, "remat"),
                       ({"compute_dtype": "float16"}, "compute_dtype"), ({"grad_accum": 0}, "grad_accum")]:
        with pytest.raises(ValueError, match=needle):
            TrainConfig(**kw)


def test_seq_len_past_the_context_is_refused(untied):
    _, _, llama = untied
    with pytest.raises(ValueError, match="past the model's context"):
        Trainer(llama, TrainConfig(seq_len=llama.config.max_seq_len + 1))


@pytest.mark.parametrize("name", ["g3_scaled_headdim", "g1_tied"])
def test_export_loads_in_transformers_with_equal_logits(models, name, tmp_path):
    from transformers import LlamaForCausalLM

    _, _, llama = models[name]
    trainer = Trainer(llama, TrainConfig(**{**BASE.to_dict(), "warmup_steps": 0}))
    trainer.step(_batch(30))  # weights that differ from the checkpoint we started from
    ids = _batch(31)["tokens"][:2]
    ours = trainer.llama().logits(ids.tolist())
    hf = LlamaForCausalLM.from_pretrained(trainer.export(tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    again = llama_jax.load(trainer.export(tmp_path / "ours", "ours"), dtype="float32").logits(ids.tolist())
    np.testing.assert_allclose(again, ours, rtol=1e-6, atol=1e-6)
    with pytest.raises(FileExistsError):
        trainer.export(tmp_path / "hf")


_CHILD = """
import sys
import llama_jax
from llama_jax.train import Trainer, TrainConfig
trainer = Trainer(llama_jax.load(sys.argv[1], dtype="float32"), TrainConfig(seq_len=16, batch_size=1))
while True:
    trainer.step_count += 1
    trainer.save(sys.argv[2])
    print("saved", trainer.step_count, flush=True)
"""


def test_a_save_killed_midway_leaves_the_previous_checkpoint_usable(untied, tmp_path):
    _, path, llama = untied
    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(path), str(ckpt)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        saved = 0
        while saved < 2:
            line = child.stdout.readline()
            assert line, "the child died before saving twice"
            saved = int(line.split()[1])
        deadline = time.time() + 60
        while not any("tmp" in n for n in os.listdir(ckpt)):  # a save in progress
            assert time.time() < deadline, "no save in progress seen"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert any("tmp" in n for n in os.listdir(ckpt)), "the killed save left nothing to ignore"
    config = TrainConfig(seq_len=16, batch_size=1)
    trainer = Trainer(llama, config, resume_from=ckpt)
    assert trainer.step_count >= saved
    _assert_close(to_hf_state_dict(trainer.params, llama.config),
                  to_hf_state_dict(Trainer(llama, config).params, llama.config), 0.0, "restored")
    trainer.step_count += 1
    trainer.save(ckpt)  # the next save goes on from there
    assert Trainer(llama, config, resume_from=ckpt).step_count == trainer.step_count


# --- The command line -------------------------------------------------------------------------------


def tiny_model_with_smollm2_tokenizer(tmp: pathlib.Path) -> pathlib.Path:
    """A tiny random model with SmolLM2's tokenizer (the command line tokenizes text), at tmp/tiny."""
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    from llama_jax.default_model import MODEL_DIR
    from llama_jax.export import copy_tokenizer_files

    smollm2 = pathlib.Path(default_model_env()["LLAMA_JAX_CACHE"]) / MODEL_DIR
    torch.manual_seed(0)
    hf = LlamaForCausalLM(HFConfig(vocab_size=49152, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=56, max_position_embeddings=256,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2))
    hf.save_pretrained(tmp / "tiny")
    assert copy_tokenizer_files(smollm2, tmp / "tiny")
    return tmp / "tiny"


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """tiny_model_with_smollm2_tokenizer, and the cache directory its runs use."""
    tmp = tmp_path_factory.mktemp("train_cli")
    return tiny_model_with_smollm2_tokenizer(tmp), tmp / "cache"


def _train_args(model, out, *extra):
    return ["train", "--model", str(model), "--out", str(out), "--steps", "10", "--seq-len", "32",
            "--batch-size", "2", "--warmup", "2", "--lr", "3e-3", "--eval-every", "5", "--eval-rows", "4",
            "--save-every", "5", *extra]


@pytest.fixture
def in_process(tok_model, monkeypatch):
    """cli.main in this process, with the run's caches in a temporary directory."""
    monkeypatch.setenv("LLAMA_JAX_CACHE", str(tok_model[1]))
    monkeypatch.setattr(cli, "_cache_compiled_programs", lambda: None)  # no persistent cache in the test process
    return cli.main


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _safetensors(path):
    from safetensors.numpy import load_file

    return load_file(str(path / "hf" / "model.safetensors"))


@pytest.mark.slow
def test_cli_train_resumed_in_a_new_process_equals_a_straight_run(tok_model, in_process, tmp_path, capsys):
    model, cache = tok_model
    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert in_process(_train_args(model, straight)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["step"] == 10 and summary["eval_loss"] is not None
    assert in_process(_train_args(model, parts, "--stop-after", "5")) == 0
    assert "continue with" in capsys.readouterr().err
    assert not (parts / "hf").exists()
    # The same device setup as this process, so that XLA compiles the same programs.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LLAMA_JAX_CACHE": str(cache)}
    p = subprocess.run([sys.executable, "-m", "llama_jax.cli", *_train_args(model, parts, "--resume")], env=env,
                       text=True, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "resuming" in p.stderr and "at step 5/10" in p.stderr

    a, b = _safetensors(straight), _safetensors(parts)
    assert set(a) == set(b)
    for name in a:
        assert np.array_equal(a[name], b[name]), f"{name} differs after resuming"
    steps = lambda m: [(r["step"], r["loss"], r["grad_norm"]) for r in m if "loss" in r]  # noqa: E731
    assert steps(_metrics(straight)) == steps(_metrics(parts))
    evals = [r for r in _metrics(straight) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    # The export is a whole Hugging Face directory: weights, config, tokenizer.
    from transformers import AutoTokenizer, LlamaForCausalLM

    LlamaForCausalLM.from_pretrained(straight / "hf")
    assert AutoTokenizer.from_pretrained(straight / "hf").encode("def f(x):")
    assert sorted(os.listdir(straight / "checkpoints")) == ["10", "5", "trainer.json"]


def test_cli_nan_loss_stops_with_a_clear_message(tok_model, in_process, tmp_path, capsys, monkeypatch):
    model, _ = tok_model
    real_step = Trainer.step

    def diverge_at_4(self, batch):
        if self.step_count == 3:
            params = self.params
            params["norm"]["weight"] = params["norm"]["weight"] * np.inf
            self.params = params
        return real_step(self, batch)

    monkeypatch.setattr(Trainer, "step", diverge_at_4)
    out = tmp_path / "run"
    assert in_process(_train_args(model, out, "--save-every", "1")) == 1
    err = capsys.readouterr().err
    assert re.search(r"error: step 4: the loss is (nan|inf)", err) and "checkpoints" in err, err
    assert sorted(os.listdir(out / "checkpoints")) == ["2", "3", "trainer.json"]  # --keep 2
    assert not (out / "hf").exists()


def test_cli_bad_input_is_refused_with_nothing_written(tok_model, in_process, models, tmp_path, capsys):
    model, _ = tok_model
    (tmp_path / "empty.txt").write_text("")
    run = tmp_path / "run"
    other = tmp_path / "other_model_run"
    Trainer(models["g3_scaled_headdim"][2], BASE).save(other / "checkpoints")
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "trainer.json").write_text(json.dumps({"model": {}, "train": {}}))
    cases = [
        (["--data", str(tmp_path / "empty.txt")], tmp_path / "new1", "empty corpus"),
        (["--seq-len", "4096"], tmp_path / "new2", "past the model's context (256 tokens)"),
        (["--warmup", "20"], tmp_path / "new3", "--warmup (20) must be between 0 and --steps (10)"),
        (["--lr", "0"], tmp_path / "new4", "--lr must be a positive number"),
        (["--lr=-1e-4"], tmp_path / "new5", "--lr must be a positive number"),
        ([], model, "holds a model checkpoint"),  # --out is the model itself
        (["--resume"], other, "another model"),
        ([], run, "already holds a training run; pass --resume"),
        (["--resume"], tmp_path / "new6", "no training run to resume"),
    ]
    for extra, out, needle in cases:
        before = _snapshot(tmp_path)
        assert in_process(_train_args(model, out, *extra)) == 2, extra
        err = capsys.readouterr().err
        assert needle in err and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (extra, err)
        assert _snapshot(tmp_path) == before, f"{extra}: something was written"
