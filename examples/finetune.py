"""Fine-tuning with the Python API: the default model on the Python documentation, a few minutes on a CPU.

    python examples/finetune.py [--steps 60] [--seq-len 128] [--batch-size 4] [--out DIR]

Tokenizes `pydoc_data.topics` (the reference documentation every Python carries) into packed rows,
holds out its last 5%, prints the held-out loss before and after training (it goes down), generates
from the tuned model, and with --out writes it as a Hugging Face directory (`llama-jax generate
--model DIR` or transformers load it). `llama-jax train` does the same from the command line, with
checkpoints and --resume.
"""

import argparse
import os
import time

import llama_jax
from llama_jax import data
from llama_jax.default_model import default_model_path
from llama_jax.paths import cache_dir
from llama_jax.train import Trainer, TrainConfig

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=60)
p.add_argument("--seq-len", type=int, default=128)
p.add_argument("--batch-size", type=int, default=4)
p.add_argument("--lr", type=float, default=2e-4)
p.add_argument("--eval-rows", type=int, default=32)
p.add_argument("--max-new-tokens", type=int, default=40)
p.add_argument("--out", help="export the tuned model here (Hugging Face safetensors)")
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

config = TrainConfig(peak_lr=args.lr, warmup_steps=args.steps // 10, total_steps=args.steps,
                     seq_len=args.seq_len, batch_size=args.batch_size)
trainer = Trainer(model, config)
before = trainer.evaluate(held_out)
print(f"held-out loss before: {before:.4f}")

batches = data.Batches(train_rows, args.batch_size)
start = time.time()
for _ in range(args.steps):
    m = trainer.step(next(batches))
    if m["step"] % 10 == 0 or m["step"] == args.steps:
        print(f"step {m['step']}: loss {m['loss']:.4f}, lr {m['lr']:.1e}, {m['tokens_per_s']:.0f} tokens/s", flush=True)
print(f"trained {args.steps} steps in {time.time() - start:.0f} s")

after = trainer.evaluate(held_out)
print(f"held-out loss after: {after:.4f} ({'down' if after < before else 'NOT down'} from {before:.4f})")

tuned = trainer.llama()  # a Llama on the current weights
prompt = "The with statement"
print(prompt + tuned.generate([prompt], max_new_tokens=args.max_new_tokens)[0].text)

if args.out:
    print("exported:", trainer.export(args.out, "hf", tokenizer_from=path))
