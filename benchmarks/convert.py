"""Converter throughput and peak memory on a generated multi-shard random model.

    python benchmarks/convert.py [--layers 8] [--dim 1024] [--ffn 2816] [--vocab 8192] [--keep DIR]

Writes a random float32 Hugging Face checkpoint (one safetensors shard per layer, plus one for the
embeddings and head), converts it in a fresh interpreter to bfloat16 and to float32, and prints
throughput (source MB per second, start-up included) and peak RSS (VmHWM) against a tiny model's,
which measures the interpreter + JAX + Orbax baseline the same way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoints_tools.synthetic import convert_in_subprocess, write_random_hf  # noqa: E402
from llama_jax.config import LlamaConfig  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--keep", help="work in this directory and keep it (default: a temp dir, removed)")
    a = p.parse_args(argv)
    config = LlamaConfig(vocab_size=a.vocab, dim=a.dim, n_layers=a.layers, n_heads=8, n_kv_heads=2, ffn_dim=a.ffn)
    tiny = LlamaConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32)
    work = a.keep or tempfile.mkdtemp(prefix="convert-bench-")
    try:
        size = write_random_hf(os.path.join(work, "src"), config)
        write_random_hf(os.path.join(work, "tiny"), tiny)
        base = convert_in_subprocess(os.path.join(work, "tiny"), os.path.join(work, "tiny_out"))
        largest = max(a.vocab * a.dim, a.dim * a.ffn) * 4
        print(f"model: {size / 1e6:.0f} MB float32 in {a.layers + 1} shards, largest tensor {largest / 1e6:.0f} MB; "
              f"baseline peak RSS (tiny model) {base['peak_rss'] / 1e6:.0f} MB")
        print(f"{'dtype':<10}{'seconds':>9}{'MB/s':>8}{'peak RSS MB':>13}{'minus baseline':>16}{'% of model':>12}")
        for dtype in ("bfloat16", "float32"):
            dst = os.path.join(work, f"out_{dtype}")
            r = convert_in_subprocess(os.path.join(work, "src"), dst, dtype=dtype)
            extra = r["peak_rss"] - base["peak_rss"]
            print(f"{dtype:<10}{r['seconds']:>9.1f}{size / 1e6 / r['seconds']:>8.0f}{r['peak_rss'] / 1e6:>13.0f}"
                  f"{extra / 1e6:>16.0f}{100 * extra / size:>11.0f}%")
            shutil.rmtree(dst)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
