"""Speculative decoding: decode tokens/s with and without, same run, on three kinds of prompts.

    python benchmarks/speculative.py [--model DIR] [--new-tokens 128] [--k 4] [--repeats 3]

The default model (SmolLM2-135M-Instruct) in chat format, greedy: repeat a given text (the output
repeats the input: proposals hold), summarize it (some phrases come back), and free writing (little
repeats). The text is the Python standard library's own (`this`, the Zen of Python). Per kind:
decode tokens/s without and with `--speculative ngram` (median of --repeats after a warm-up, the
runs interleaved), the ratio, the acceptance rate and the tokens kept per verify, and whether the
outputs are the same tokens (they must be).
"""

from __future__ import annotations

import argparse
import codecs
import statistics
import this

import llama_jax
from llama_jax.api import Llama
from llama_jax.default_model import default_model_path

ZEN = codecs.decode(this.s, "rot13")

KINDS = {
    "repeat/edit": f"Repeat the following text exactly, with 'Python' in capitals:\n\n{ZEN}",
    "summarize": f"Summarize the following text in a few sentences:\n\n{ZEN}",
    "free writing": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the default model)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    plain = llama_jax.load(args.model or default_model_path())
    spec = Llama(plain.model, tokenizer=plain.tokenizer, chat_format=plain.chat_format,
                 speculative={"method": "ngram", "num_speculative_tokens": args.k})
    rows = []
    for kind, text in KINDS.items():
        prompt = plain.chat_prompt([{"role": "user", "content": text}])
        run = {name: (lambda m=m: m.generate([prompt], max_new_tokens=args.new_tokens, stop_token_ids=[])[0])
               for name, m in (("plain", plain), ("ngram", spec))}
        for r in run.values():
            r()  # compiles
        rates = {name: [] for name in run}
        outs = {}
        for i in range(args.repeats):
            for name in (("plain", "ngram") if i % 2 == 0 else ("ngram", "plain")):
                c = run[name]()
                rates[name].append(c.timings["decode_tokens_per_s"])
                outs[name] = c
        base, fast = statistics.median(rates["plain"]), statistics.median(rates["ngram"])
        report = outs["ngram"].timings["speculative"]
        rows.append((kind, len(prompt), base, fast, report, outs["plain"].token_ids == outs["ngram"].token_ids))

    print(f"\nSmolLM2 greedy, {args.new_tokens} new tokens, K={args.k}, median of {args.repeats} (interleaved)")
    print("| prompt | prompt tokens | plain tok/s | ngram tok/s | ngram / plain | acceptance | kept per verify "
          "| same tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for kind, n, base, fast, rep, same in rows:
        acc = "-" if rep["acceptance_rate"] is None else f"{rep['acceptance_rate']:.2f}"
        per = "-" if rep["accepted_per_step"] is None else f"{rep['accepted_per_step']:.2f}"
        print(f"| {kind} | {n} | {base:.1f} | {fast:.1f} | {fast / base:.2f}x | {acc} | {per} | "
              f"{'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
