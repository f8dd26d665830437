"""Long context: prefill seconds, decode tokens/s at that context, peak memory, KV-cache bytes.

    python benchmarks/long_context.py                                   # a tiny config, 32K tokens, CPU
    python benchmarks/long_context.py --tokens 131072 --config llama3.1-8b  # on a GPU (bf16, random weights)

A randomly initialized model of the config (the tiny default: 4 layers, dim 128, 4 query heads, 2 KV
heads) takes one prompt of `--tokens` tokens, prefilled in chunks, then decodes `--new-tokens`.
Prints the time to the first token (compile excluded: a warm-up run first), decode tokens/s at that
context, peak host RSS, peak device memory where the device reports it, and the analytic KV-cache
bytes per sequence (2 x layers x tokens x KV heads x head dim x bytes; Llama 3.1 8B in bf16 at 128K
tokens: 16 GiB).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import numpy as np

TINY = dict(vocab_size=1024, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384, bos_id=None, eos_ids=())


def kv_cache_bytes(config, tokens: int, itemsize: int) -> int:
    return 2 * config.n_layers * tokens * config.n_kv_heads * config.head_dim * itemsize


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--config", default="tiny", help="'tiny' or a preset name (llama_jax.PRESETS)")
    p.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: the backend's)")
    p.add_argument("--prefill-chunk", type=int, default=None)
    args = p.parse_args(argv)

    import jax

    import llama_jax

    if args.config == "tiny":
        config = llama_jax.LlamaConfig(**TINY, max_seq_len=args.tokens + args.new_tokens)
    else:
        config = llama_jax.PRESETS[args.config]
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, args.tokens + args.new_tokens))
    runtime = llama_jax.RuntimeConfig(param_dtype=args.dtype, dtype=args.dtype, prefill_chunk=args.prefill_chunk)
    model = llama_jax.from_config(config, runtime)
    c = model.config
    prompt = np.random.RandomState(0).randint(0, c.vocab_size, args.tokens).tolist()

    def run(n):
        return model.generate([prompt], max_new_tokens=n, stop_token_ids=[])[0].timings

    run(args.new_tokens)  # warm-up: compiles the prefill chunk and the decode loop
    t = run(args.new_tokens)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    kv = kv_cache_bytes(c, args.tokens + args.new_tokens, np.dtype(model.runtime.dtype).itemsize)
    print(f"{args.config}: {c.n_layers} layers, dim {c.dim}, {c.n_heads}/{c.n_kv_heads} heads, {model.runtime.dtype}, "
          f"prefill chunk {c.prefill_chunk}, {device.platform} ({device.device_kind})")
    print(f"{'context':>8} {'prefill s':>10} {'decode tok/s':>13} {'peak RSS':>10} {'peak device':>12} {'KV cache':>10}")
    peak_dev = f"{stats['peak_bytes_in_use'] / 2**30:.2f} GiB" if "peak_bytes_in_use" in stats else "-"
    print(f"{args.tokens:>8} {t['time_to_first_token_s']:>10.2f} {t['decode_tokens_per_s'] or 0:>13.1f} "
          f"{rss / 2**30:>6.2f} GiB {peak_dev:>12} {kv / 2**30:>6.2f} GiB")
    ref = llama_jax.LLAMA3_1_8B
    print(f"(Llama 3.1 8B, bf16, 131072 tokens: KV cache {kv_cache_bytes(ref, 131072, 2) / 2**30:.0f} GiB per sequence)")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"wall {time.perf_counter() - t0:.0f} s")
