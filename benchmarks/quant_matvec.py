"""Quantized matrix-vector products on the CPU through XLA: float32 against int8 and int4 qlinear.

    python benchmarks/quant_matvec.py [--repeats 5] [--shapes smollm2,llama1b] [--layout both]

One token's product x [1, in] @ W, jitted, at SmolLM2-135M's and Llama 3.2 1B's linear shapes, in
the inference layout [out, in] (and the stored [in, out] with --layout both). Variants: float32;
int8 per output channel and int4 (groups of 32, symmetric, two nibbles a byte) through
`quant.qlinear` as one product (the dequantization written into the dot) and with `out_tile` (the
output channels 256 at a time through lax.map). Repeats are interleaved (every variant once per
round) so a neighbour's load spreads over all of them; the table shows the median per call and
float32's time over the variant's (above 1: faster than float32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = {  # (name, in, out) per model: attention wq, k/v, the FFN up/gate and down products
    "smollm2": [("wq 576x576", 576, 576), ("wk 576x192", 576, 192), ("w1 576x1536", 576, 1536),
                ("w2 1536x576", 1536, 576)],
    "llama1b": [("wq 2048x2048", 2048, 2048), ("wk 2048x512", 2048, 512), ("w1 2048x8192", 2048, 8192),
                ("w2 8192x2048", 8192, 2048)],
}
TILE = 256


def _timed(fn, args, budget_s=0.15):
    """Seconds per call of an already compiled fn, calls batched to about budget_s."""
    fn(*args).block_until_ready()
    n, t = 1, 0.0
    while True:
        start = time.perf_counter()
        for _ in range(n):
            out = fn(*args)
        out.block_until_ready()
        t = time.perf_counter() - start
        if t >= budget_s or n >= 4096:
            return t / n
        n = n * 2 if t < budget_s / 4 else max(n + 1, int(n * budget_s / t))


def variants(k: int, n: int, axis: int, seed: int = 0):
    """name -> (jitted fn, args) for one shape and layout."""
    import jax
    import jax.numpy as jnp

    from llama_jax import quant

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05  # [in, out]
    stored = w if axis == -2 else np.ascontiguousarray(w.T)
    x = jnp.asarray(rng.standard_normal((1, k)).astype(np.float32))
    spec = "bk,kn->bn" if axis == -2 else "bk,nk->bn"
    out = {"float32": (jax.jit(lambda x, w: jnp.einsum(spec, x, w)), (x, jnp.asarray(stored)))}
    tile = TILE if n % TILE == 0 and n > TILE else None
    for fmt in ("int8", "int4"):
        q = jax.device_put(quant.quantize(stored, fmt, axis=axis))
        out[fmt] = (jax.jit(quant.qlinear), (x, q))
        if tile:
            out[f"{fmt} tiled"] = (jax.jit(lambda x, q: quant.qlinear(x, q, out_tile=tile)), (x, q))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shapes", default="smollm2,llama1b", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--layout", choices=("inference", "both"), default="inference",
                   help="inference: [out, in] only; both: also the stored [in, out]")
    args = p.parse_args(argv)
    import jax

    layouts = [(-1, "[out,in]")] + ([(-2, "[in,out]")] if args.layout == "both" else [])
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, median of {args.repeats} interleaved rounds")
    header = f"{'shape':<16}{'layout':<10}{'variant':<12}{'us/call':>10}{'vs f32':>8}{'MB read':>9}"
    print(header)
    print("-" * len(header))
    for model in args.shapes.split(","):
        for name, k, n in SHAPES[model]:
            for axis, layout in layouts:
                vs = variants(k, n, axis)
                times = {v: [] for v in vs}
                for _ in range(args.repeats):
                    for v, (fn, fn_args) in vs.items():
                        times[v].append(_timed(fn, fn_args))
                base = statistics.median(times["float32"])
                for v, ts in times.items():
                    t = statistics.median(ts)
                    mb = vs[v][1][1].nbytes / 1e6  # a jax.Array's or a QArray's bytes
                    print(f"{name:<16}{layout:<10}{v:<12}{t * 1e6:>10.1f}{base / t:>7.2f}x{mb:>9.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
