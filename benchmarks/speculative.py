"""Speculative decoding: decode tokens/s of one target model alone, with n-gram proposals and with a
draft model's, same run, on three kinds of prompts.

    python benchmarks/speculative.py [--model DIR --draft DIR] [--new-tokens 128] [--k 4] [--repeats 3]

The target, by default, is the default model (SmolLM2-135M-Instruct) dequantized to float32 (as
benchmarks/quant_llamacpp.py builds it), and the draft is that model as `load` keeps it (its GGUF
Q4_1 blocks): a quantized copy of the same network, cheaper per token, whose guesses should mostly
hold. --model DIR makes that directory, as `load` reads it, the target instead, and then needs
--draft DIR (a smaller model with its tokenizer); --draft alone replaces the Q4_1 draft.

Chat format, greedy, `--new-tokens` tokens with no stop. Prompts: repeat a given text (the output
repeats the input: n-gram proposals hold), summarize it (some phrases come back), and free writing
(little repeats). The text is the Python standard library's own (`this`, the Zen of Python). Per
kind, for the target alone (plain), with `ngram` and with `draft` (`--k` tokens proposed per
verify): decode tokens/s (median of --repeats after a compiling warm-up, the three runs interleaved
in a rotating order), its ratio to plain, the acceptance rate (proposed tokens kept), the tokens kept
per verify, and whether the output is plain's, token for token (it must be).
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import statistics

import llama_jax
from llama_jax.api import Llama
from llama_jax.default_model import default_model_path

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
    import this
ZEN = codecs.decode(this.s, "rot13")

KINDS = {
    "repeat/edit": f"Repeat the following text exactly, with 'Python' in capitals:\n\n{ZEN}",
    "summarize": f"Summarize the following text in a few sentences:\n\n{ZEN}",
    "free writing": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}
METHODS = ("plain", "ngram", "draft")


def default_pair() -> tuple[Llama, Llama]:
    """The float32 dequantization of the default model (the target) and the model as loaded, its
    Q4_1 blocks kept (the draft)."""
    import jax.numpy as jnp

    from llama_jax import api, quant

    kept = llama_jax.load(default_model_path())
    dense = quant.dequantize_params(kept.params, jnp.float32)
    target = api.from_params(kept.config, dense, kept.runtime, tokenizer=kept.tokenizer,
                             chat_format=kept.chat_format)
    return target, kept


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="the target's directory (default: the default model in float32); needs --draft")
    p.add_argument("--draft", help="the draft's directory (default: the default model's Q4_1 blocks)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.model and not args.draft:
        p.error("--model needs --draft (the Q4_1 default model drafts only for its own float32 copy)")

    if args.model:
        target, draft = llama_jax.load(args.model), args.draft
    else:
        target, kept = default_pair()
        draft = args.draft or kept
    # One target for every column: the speculative ones wrap its arrays, not copies.
    models = {"plain": target}
    for method, extra in (("ngram", {}), ("draft", {"model": draft})):
        models[method] = Llama(target.model, tokenizer=target.tokenizer, chat_format=target.chat_format,
                               speculative={"method": method, "num_speculative_tokens": args.k, **extra})

    rows = []
    for kind, text in KINDS.items():
        prompt = target.chat_prompt([{"role": "user", "content": text}])
        run = {name: (lambda m=m: m.generate([prompt], max_new_tokens=args.new_tokens, stop_token_ids=[])[0])
               for name, m in models.items()}
        for r in run.values():
            r()  # compiles
        rates = {name: [] for name in METHODS}
        outs = {}
        for i in range(args.repeats):
            for name in METHODS[i % len(METHODS):] + METHODS[:i % len(METHODS)]:  # a rotating order
                c = run[name]()
                rates[name].append(c.timings["decode_tokens_per_s"])
                outs[name] = c
        rows.append((kind, len(prompt), {name: statistics.median(rates[name]) for name in METHODS}, outs))

    pair = (f"target {args.model}, draft {args.draft}" if args.model else
            f"target SmolLM2-135M-Instruct float32 (dequantized), draft {args.draft or 'its Q4_1 blocks'}")
    print(f"\n{pair}; greedy, {args.new_tokens} new tokens, K={args.k}, median of {args.repeats} (interleaved)")
    print("| prompt | prompt tokens | method | tok/s | / plain | acceptance | kept per verify | same tokens as plain |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | --- |")
    differ = []
    for kind, n, rate, outs in rows:
        for name in METHODS:
            rep = outs[name].timings.get("speculative") or {}
            acc = "-" if rep.get("acceptance_rate") is None else f"{rep['acceptance_rate']:.2f}"
            per = "-" if rep.get("accepted_per_step") is None else f"{rep['accepted_per_step']:.2f}"
            same = outs[name].token_ids == outs["plain"].token_ids
            if not same:
                differ.append(f"{kind}/{name}")
            print(f"| {kind} | {n} | {name} | {rate[name]:.1f} | {rate[name] / rate['plain']:.2f}x | {acc} | {per} | "
                  f"{'yes' if same else 'NO'} |")
    if differ:
        print(f"\nNO: NOT THE SAME TOKENS AS PLAIN: {', '.join(differ)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
