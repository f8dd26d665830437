"""Scanned stacked layers against a loop over per-layer arrays: decode speed and compile time.

    python benchmarks/layers.py [--model DIR]

Decode: greedy, batch 1, 64 tokens after 16 (median of 3) on DIR (default SmolLM2-135M-Instruct).
Compile: the full-sequence forward of a 32-layer config (SmolLM2 widths), first call minus second.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def compile_seconds(n_layers: int, unstack: bool) -> float:
    import jax
    import llama_jax

    jax.clear_caches()
    cfg = dataclasses.replace(llama_jax.SMOLLM2_135M, n_layers=n_layers)
    model = llama_jax.from_config(cfg, unstack_layers=unstack)
    ids = [[1] * 16]
    t = time.perf_counter()
    model.logits(ids)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.logits(ids)
    return first - (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    args = p.parse_args(argv)

    import jax
    import llama_jax
    from llama_jax.bench import time_generate

    model_dir = args.model
    if model_dir is None:
        from smollm2 import _cache_root, prepare_smollm2
        model_dir = str(prepare_smollm2(_cache_root() / "smollm2-135m-instruct-hf"))
    print(f"device {jax.devices()[0].device_kind}")
    print(f"{'layers':<12} {'decode tok/s':>13} {'decode compile s':>17} {'32-layer compile s':>19}")
    for unstack, name in [(True, "per-layer"), (False, "scan")]:
        model = llama_jax.load(model_dir, dtype="float32", unstack_layers=unstack)
        r = time_generate(model, prompt_len=16, new_tokens=64)
        print(f"{name:<12} {r['decode_tok_s']:>13.1f} {r['warmup_s']:>17.1f} {compile_seconds(32, unstack):>19.1f}")


if __name__ == "__main__":
    main()
