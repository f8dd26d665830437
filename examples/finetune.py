"""Fine-tuning with the Python API: the default model on the Python documentation, a few minutes on a CPU.

    python examples/finetune.py [--steps 60] [--seq-len 128] [--batch-size 4] [--lora-rank 16] [--out DIR]

Tokenizes `pydoc_data.topics` (the reference documentation every Python carries) into packed rows,
holds out its last 5%, and trains twice from the same model: every weight (full fine-tuning), then
low-rank adapters with the model frozen (LoRA, rank 16 on every projection). Each prints the
held-out loss before and after (it goes down); the LoRA run also the adapter's size on disk against
the model's. Then it generates from the fully tuned model, and with --out writes it as a Hugging
Face directory (DIR/full) and the adapter in PEFT's format (DIR/adapter: `peft.PeftModel` or
`llama_jax.load(base, lora=DIR/adapter)` load it). `llama-jax train` does the same from the command
line (`--lora-rank 16` for LoRA), with checkpoints and --resume.
"""

import argparse
import math
import os
import tempfile
import time

import llama_jax
from llama_jax import data
from llama_jax.checkpoint import param_shapes
from llama_jax.default_model import default_model_path
from llama_jax.paths import cache_dir
from llama_jax.train import Trainer, TrainConfig

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--lora-rank", type=int, default=16)
p.add_argument("--lora-lr", type=float, default=1e-3, help="adapters train from zero: a higher rate than --lr")
p.add_argument("--eval-rows", type=int, default=32)
p.add_argument("--max-new-tokens", type=int, default=40)
p.add_argument("--out", help="export the tuned model (DIR/full, Hugging Face safetensors) and the adapter "
                             "(DIR/adapter)")
args = p.parse_args()

path = default_model_path()
model = llama_jax.load(path, dtype="float32")  # float32 master weights; compute in float32 on CPU

# Text -> a token file (once, cached) -> rows of packed documents with segment ids and positions.
tokens = data.tokenize_corpus(None, model.tokenizer, os.path.join(cache_dir(), "tokens"))
pad = model.tokenizer.eos_ids[0]
train_rows = tokens.split("train", args.seq_len, pad_id=pad)
held_out = data.eval_batches(tokens.split("eval", args.seq_len, pad_id=pad), args.batch_size,
                             max_rows=args.eval_rows)
print(f"{len(tokens.tokens):,} tokens: {len(train_rows)} training rows of {args.seq_len}")


def train(name: str, config: TrainConfig) -> Trainer:
    """`args.steps` steps of `config` from the loaded model, the held-out loss before and after."""
    trainer = Trainer(model, config)
    before = trainer.evaluate(held_out)
    print(f"{name}: held-out loss before: {before:.4f}")
    batches = data.Batches(train_rows, args.batch_size)  # the same rows in the same order for both runs
    start = time.time()
    for _ in range(args.steps):
        m = trainer.step(next(batches))
        if m["step"] % 10 == 0 or m["step"] == args.steps:
            print(f"{name}: step {m['step']}: loss {m['loss']:.4f}, lr {m['lr']:.1e}, {m['tokens_per_s']:.0f} tokens/s",
                  flush=True)
    after = trainer.evaluate(held_out)
    print(f"{name}: trained {args.steps} steps in {time.time() - start:.0f} s; held-out loss after: {after:.4f} "
          f"({'down' if after < before else 'NOT down'} from {before:.4f})")
    return trainer


common = dict(warmup_steps=args.steps // 10, total_steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size)
full = train("full fine-tuning", TrainConfig(peak_lr=args.lr, **common))
lora = train(f"LoRA rank {args.lora_rank}", TrainConfig(peak_lr=args.lora_lr, lora_rank=args.lora_rank, **common))

with tempfile.TemporaryDirectory() as tmp:
    adapter = lora.export(os.path.join(args.out or tmp, "adapter"), "peft", base_model=path)
    adapter_bytes = sum(os.path.getsize(os.path.join(adapter, f)) for f in os.listdir(adapter))
model_bytes = 4 * sum(math.prod(shape) for shape in param_shapes(model.config).values())
print(f"adapter on disk: {adapter_bytes / 1e6:.1f} MB, {adapter_bytes / model_bytes:.1%} of the model's "
      f"{model_bytes / 1e6:.0f} MB (float32)")

tuned = full.llama()  # a Llama on the current weights
prompt = "The with statement"
print(prompt + tuned.generate([prompt], max_new_tokens=args.max_new_tokens)[0].text)

if args.out:
    print("exported:", full.export(os.path.join(args.out, "full"), "hf", tokenizer_from=path), adapter)
