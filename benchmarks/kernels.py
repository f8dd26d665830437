"""Benchmark our Pallas kernels against XLA, jax's own Pallas ops and cuDNN, on one table.

    python benchmarks/kernels.py          # GPU: the real shapes below
    python benchmarks/kernels.py --tiny   # tiny shapes, interpret mode (the default with no GPU)

Shapes (GPU): flash attention forward B=2, H=32, K=8, E=128, T=S in {1024, 4096, 16384},
causal, bf16; decode attention B=8, H=32, K=8, E=128, contexts 8k and 128k (every sequence
full), bf16; RMSNorm [8192, 4096] bf16, plain and with the residual add.

Each row: median time of `--iters` runs after warm-up (`jax.block_until_ready` around each),
throughput (attention: 4*B*H*T*S*E flops, halved when causal; decode and RMSNorm: bytes read
plus written), that throughput as a fraction of the ceilings measured in the same run (a
large device-to-device copy, a large bf16 matmul), and the max error against the XLA
reference. jax's `mha` gets K/V repeated to H heads outside the timed call (it has no GQA).
"""

import argparse
import functools
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pallas_kernels import (decode_attention, decode_attention_reference,  # noqa: E402
                            flash_attention, flash_attention_reference, rms_norm,
                            rms_norm_reference)


def timed(f, *args, iters):
    """Median seconds of f(*args) after two warm-up calls (the first compiles)."""
    for _ in range(2):
        jax.block_until_ready(f(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ceilings(tiny, iters):
    """(copy GB/s, bf16 matmul TFLOP/s) measured on this device."""
    n = 1 << (20 if tiny else 28)  # 512 MiB of bf16 on a GPU
    x = jnp.ones((n,), jnp.bfloat16)
    copy = timed(jax.jit(lambda x: x + 1), x, iters=iters)  # reads and writes n elements
    m = 256 if tiny else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    mm = timed(jax.jit(lambda a: a @ a), a, iters=iters)
    return 2 * n * 2 / copy / 1e9, 2 * m ** 3 / mm / 1e12


def normal(key, shape, dtype=jnp.bfloat16):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def max_err(out, ref):
    if ref is None:
        return float("nan")
    outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
    return max(float(jnp.max(jnp.abs(o.astype(jnp.float32) - r.astype(jnp.float32))))
               for o, r in zip(outs, refs))


def run(rows, kernel, shape, impls, args, work, unit, ceiling, iters):
    """Times each implementation; `work` is flops or bytes, `unit` 'TFLOP/s' or 'GB/s'."""
    ref = None
    results = []
    for name, f in impls:
        try:
            out = jax.block_until_ready(f(*args))
            if name == "xla":
                ref = out
            seconds = timed(f, *args, iters=iters)
            results.append((name, seconds, out))
        except Exception as e:  # OOM, no cuDNN, unsupported shape: report and go on
            rows.append((kernel, shape, name, f"skipped: {type(e).__name__}: {str(e)[:60]}"))
    scale = 1e12 if unit == "TFLOP/s" else 1e9
    for name, seconds, out in results:
        rate = work / seconds / scale
        rows.append((kernel, shape, name, seconds * 1e3, rate, unit, rate / ceiling,
                     max_err(out, ref)))


def bench_flash(rows, tiny, interpret, flops_ceiling, iters):
    from jax.experimental.pallas.ops.gpu import attention as jax_attention

    B, H, K, E = (1, 4, 2, 64) if tiny else (2, 32, 8, 128)
    for S in [128] if tiny else [1024, 4096, 16384]:
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(S), 3)
        q, k, v = normal(kq, (B, S, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
        k_rep, v_rep = jnp.repeat(k, H // K, axis=2), jnp.repeat(v, H // K, axis=2)
        impls = [
            ("xla", jax.jit(functools.partial(flash_attention_reference, causal=True))),
            ("ours", jax.jit(functools.partial(flash_attention, causal=True, interpret=interpret))),
            ("jax mha", jax.jit(lambda q, k, v: jax_attention.mha(
                q, k_rep, v_rep, None, sm_scale=1 / math.sqrt(E), causal=True,
                interpret=interpret))),
        ]
        if not tiny:
            impls.append(("cudnn", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"))))
        run(rows, "flash fwd", f"B{B} H{H} K{K} S{S} E{E}", impls, (q, k, v),
            4 * B * H * S * S * E / 2, "TFLOP/s", flops_ceiling, iters)


def bench_decode(rows, tiny, interpret, bw_ceiling, iters):
    from jax.experimental.pallas.ops.gpu import decode_attention as jax_decode

    B, H, K, E = (2, 4, 2, 64) if tiny else (8, 32, 8, 128)
    for S in [512] if tiny else [8192, 131072]:
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(S), 3)
        q, k, v = normal(kq, (B, H, E)), normal(kk, (B, S, K, E)), normal(kv, (B, S, K, E))
        lengths = jnp.full((B,), S, jnp.int32)
        impls = [
            ("xla", jax.jit(lambda q, k, v, n: decode_attention_reference(q, k, v, lengths=n))),
            ("ours", jax.jit(lambda q, k, v, n: decode_attention(
                q, k, v, lengths=n, interpret=interpret))),
            ("jax gqa", jax.jit(lambda q, k, v, n: jax_decode.gqa(
                q, k, v, kv_seq_len=n, interpret=interpret))),
        ]
        nbytes = 2 * B * S * K * E * 2 + 2 * B * H * E * 2  # K and V read, q read, o written
        run(rows, "decode", f"B{B} H{H} K{K} S{S} E{E}", impls, (q, k, v, lengths), nbytes, "GB/s",
            bw_ceiling, iters)


def bench_rms_norm(rows, tiny, interpret, bw_ceiling, iters):
    N, D = (64, 256) if tiny else (8192, 4096)
    kx, kr, kw = jax.random.split(jax.random.PRNGKey(0), 3)
    x, r, w = normal(kx, (N, D)), normal(kr, (N, D)), 1 + 0.1 * normal(kw, (D,))
    ours = functools.partial(rms_norm, interpret=interpret)
    run(rows, "rms_norm", f"[{N}, {D}]",
        [("xla", jax.jit(rms_norm_reference)), ("ours", jax.jit(ours))],
        (x, w), 2 * N * D * 2, "GB/s", bw_ceiling, iters)
    run(rows, "rms_norm+res", f"[{N}, {D}]",
        [("xla", jax.jit(rms_norm_reference)), ("ours", jax.jit(ours))],
        (x, w, r), 4 * N * D * 2, "GB/s", bw_ceiling, iters)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny shapes in interpret mode")
    parser.add_argument("--iters", type=int, default=None, help="timed runs per row")
    args = parser.parse_args()
    on_gpu = jax.default_backend() == "gpu"
    tiny = args.tiny or not on_gpu
    iters = args.iters or (3 if tiny else 20)
    interpret = not on_gpu

    gbps, tflops = ceilings(tiny, iters)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax "
          f"{jax.__version__}, {'tiny shapes, interpret mode' if tiny else 'full shapes'}")
    print(f"ceilings: copy {gbps:.1f} GB/s, bf16 matmul {tflops:.2f} TFLOP/s")
    rows = []
    bench_flash(rows, tiny, interpret, tflops, iters)
    bench_decode(rows, tiny, interpret, gbps, iters)
    bench_rms_norm(rows, tiny, interpret, gbps, iters)

    header = f"{'kernel':<13} {'shape':<26} {'impl':<8} {'ms':>9} {'rate':>16} {'of ceil':>8} " \
             f"{'max err':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        if len(row) == 4:
            print(f"{row[0]:<13} {row[1]:<26} {row[2]:<8} {row[3]}")
        else:
            kernel, shape, impl, ms, rate, unit, frac, err = row
            print(f"{kernel:<13} {shape:<26} {impl:<8} {ms:9.3f} {rate:8.2f} {unit:<7} "
                  f"{frac:8.1%} {err:9.2e}")


if __name__ == "__main__":
    main()
