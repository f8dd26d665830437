"""Quantized matrix-vector products on the CPU: float32 against int8, int4 (and fp8) weights, through
XLA and through the C++ backend (cpu_kernels).

    python benchmarks/quant_matvec.py [--backend cpu,xla] [--shapes smollm2,llama1b] [--rows 1]
                                      [--repeats 5] [--layout both]

One decode step's product x [rows, in] @ W at SmolLM2-135M's and Llama 3.2 1B's linear shapes (the
tied output head included), in the inference layout [out, in] (and, for XLA, the stored [in, out]
with --layout both). Variants:
- xla: float32; int8 per output channel and int4 (groups of 32, symmetric) through
  `llama_jax.quant.qlinear`, as one product and with `out_tile` (256 output channels at a time).
- cpu: float32 through `cpu_kernels.matvec` (`gemm` from cpu_kernels.MIN_ROWS rows, as ops.linear
  chooses: --rows 512 times prefill); `cpu_kernels.qlinear` on int8 per output channel (what
  `load(quantize="int8")` makes), GGUF Q8_0 (int8, groups of 32, f16 scales), int4 (groups of 32,
  symmetric, f16 scales), GGUF Q4_1 (int4 with mins) and fp8.
A model's decode step reads every weight once, far more bytes than the caches hold, so each product
is timed from memory: one jitted chain runs it over enough copies of the weight to exceed 64 MB (each
product's input depends on the one before, so they run one at a time); products of many rows are
bound by arithmetic instead, and run over two copies. Repeats are interleaved
(every variant once per round) so a neighbour's load spreads over all of them. The table shows the
median time per product, the weight bytes it read per second, and the backend's float32 time over
the variant's (above 1: faster); then, per variant, one SmolLM2 token's products (30 layers of wq,
wk, wv, wo, w1, w3, w2, and the head) added up, as tokens/s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

SHAPES = {  # (name, in, out) per model: attention wq, k/v, the FFN up/gate and down products, the head
    "smollm2": [("wq 576x576", 576, 576), ("wk 576x192", 576, 192), ("w1 576x1536", 576, 1536),
                ("w2 1536x576", 1536, 576), ("head 576x49152", 576, 49152)],
    "llama1b": [("wq 2048x2048", 2048, 2048), ("wk 2048x512", 2048, 512), ("w1 2048x8192", 2048, 8192),
                ("w2 8192x2048", 8192, 2048)],
}
# Products of each shape in one SmolLM2 token: per layer wq and wo, wk and wv, w1 and w3, w2.
SMOLLM2_TOKEN = {"wq 576x576": 60, "wk 576x192": 60, "w1 576x1536": 60, "w2 1536x576": 30, "head 576x49152": 1}
TILE = 256
RING_BYTES = 64 << 20  # twice this CPU's L3: the copies come from memory, as a decode step's weights do
MAX_COPIES = 1024


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


def _nbytes(w) -> int:
    import jax

    return sum(a.nbytes for a in jax.tree.leaves(w))


def _chain(product, w, x):
    """(jitted fn, args, copies): `product(x, w)` over copies of w adding up to RING_BYTES, in order."""
    import jax

    import cpu_kernels

    many_rows = x.shape[0] >= cpu_kernels.MIN_ROWS
    copies = 2 if many_rows else int(min(MAX_COPIES, max(2, -(-RING_BYTES // _nbytes(w)))))
    ring = [jax.tree.map(lambda a: a.copy(), w) for _ in range(copies)]

    def run(x, ring):
        y = product(x, ring[0])
        for w in ring[1:]:
            y = product(x + 1e-30 * y[:, :1], w)  # depends on the last product, changes nothing
        return y
    return jax.jit(run), (x, ring), copies


def variants(backend: str, k: int, n: int, axis: int, rows: int, seed: int = 0):
    """name -> (product(x, w), w, x) for one shape, layout and backend."""
    import jax
    import jax.numpy as jnp

    from llama_jax import quant

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05  # [in, out]
    stored = w if axis == -2 else np.ascontiguousarray(w.T)
    x = jnp.asarray(rng.standard_normal((rows, k)).astype(np.float32))
    q = lambda fmt, **kw: quant.quantize(stored, fmt, axis=axis, **kw)  # noqa: E731
    if backend == "xla":
        spec = "bk,kn->bn" if axis == -2 else "bk,nk->bn"
        out = {"float32": (lambda x, w: jnp.einsum(spec, x, w), jnp.asarray(stored), x)}
        tile = TILE if n % TILE == 0 and n > TILE else None
        for fmt in ("int8", "int4"):
            qa = jax.device_put(q(fmt))
            out[fmt] = (quant.qlinear, qa, x)
            if tile:
                out[f"{fmt} tiled"] = (lambda x, q: quant.qlinear(x, q, out_tile=tile), qa, x)
        return out

    import cpu_kernels

    def kernel(x, q):
        return cpu_kernels.qlinear(x, q.values, q.scales, q.mins, format=q.format, group_size=q.group_size)

    f16 = lambda q: quant.QArray(q.values, q.scales.astype(jnp.float16), q.mins, q.format,  # noqa: E731
                                 q.group_size, q.axis)
    def f32(x, w):  # as ops.linear chooses
        return cpu_kernels.gemm(x, w, False, True) if rows >= cpu_kernels.MIN_ROWS else cpu_kernels.matvec(x, w, True)

    out = {"float32": (f32, jnp.asarray(stored), x),
           "int8": (kernel, q("int8"), x),
           "Q8_0": (kernel, f16(q("int8", group_size=32)), x),
           "int4": (kernel, q("int4"), x),
           "Q4_1": (kernel, q("int4", asymmetric=True), x),
           "fp8": (kernel, q("fp8"), x)}
    return {name: (fn, jax.device_put(w), x) for name, (fn, w, x) in out.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", default="cpu,xla", help="comma-separated: cpu (cpu_kernels), xla")
    p.add_argument("--shapes", default="smollm2,llama1b", help="comma-separated: " + ",".join(SHAPES))
    p.add_argument("--rows", type=int, default=1, help="rows of x (a decode step's batch)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--layout", choices=("inference", "both"), default="inference",
                   help="inference: [out, in] only; both: also the stored [in, out] (xla only)")
    args = p.parse_args(argv)
    import jax

    backends = args.backend.split(",")
    if "cpu" in backends:
        import cpu_kernels

        cpu_kernels.require()
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, x [{args.rows}, in], median of {args.repeats} "
          f"interleaved rounds, weights from memory (copies over {RING_BYTES >> 20} MB)")
    for backend in backends:
        layouts = [(-1, "[out,in]")] + ([(-2, "[in,out]")] if args.layout == "both" and backend == "xla" else [])
        header = f"{'shape':<16}{'layout':<10}{'variant':<12}{'us/call':>10}{'GB/s':>8}{'vs f32':>8}{'MB':>8}"
        print(f"\n{backend}\n{header}\n{'-' * len(header)}")
        token = {}  # variant -> seconds of one SmolLM2 token's products
        for model in args.shapes.split(","):
            for name, k, n in SHAPES[model]:
                for axis, layout in layouts:
                    chains = {v: _chain(fn, w, x) for v, (fn, w, x) in variants(backend, k, n, axis, args.rows).items()}
                    times = {v: [] for v in chains}
                    for _ in range(args.repeats):
                        for v, (fn, fn_args, copies) in chains.items():
                            times[v].append(_timed(fn, fn_args) / copies)
                    base = statistics.median(times["float32"])
                    for v, ts in times.items():
                        t = statistics.median(ts)
                        nbytes = _nbytes(chains[v][1][1][0])
                        print(f"{name:<16}{layout:<10}{v:<12}{t * 1e6:>10.1f}{nbytes / t / 1e9:>8.1f}"
                              f"{base / t:>7.2f}x{nbytes / 1e6:>8.2f}")
                        if model == "smollm2" and axis == -1:
                            token[v] = token.get(v, 0.0) + SMOLLM2_TOKEN[name] * t
        if token:
            print(f"\nSmolLM2 token ({backend}): {sum(SMOLLM2_TOKEN.values())} products")
            print(f"{'variant':<12}{'ms':>8}{'tok/s':>8}{'vs f32':>8}")
            for v, t in token.items():
                print(f"{v:<12}{t * 1e3:>8.2f}{1 / t:>8.1f}{token['float32'] / t:>7.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
