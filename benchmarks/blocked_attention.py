"""Blocked XLA attention vs the naive reference and torch SDPA, on this CPU (issue 12).

    python benchmarks/blocked_attention.py             # every row, a few minutes on 2 cores
    python benchmarks/blocked_attention.py --quick     # 512 and 2048 prefill, chunk, decode B=1
    python benchmarks/blocked_attention.py --naive-8192  # also the naive reference at 8192 (5 GB)

SmolLM2-135M attention shapes, f32: B=1, H=9, K=3, E=64. Rows:
  prefill T=S in {512, 2048, 8192}, causal self-attention (torch: is_causal=True);
  chunk: T=512 queries at q_offset 1536 over S=2048 cached keys (torch: a boolean mask, since its
    is_causal aligns the diagonal top-left);
  train: forward + backward at T=S=2048 (torch: SDPA's backward);
  decode: one query per sequence, B in {1, 2, 4}, over an S=8192 cache holding 1000..8000
    tokens (ours and the reference get the whole cache and `lengths`; torch gets the cache cut
    to max(lengths), as transformers' dynamic cache would hold it).

Each time is the minimum of --iters runs after a warm-up, the implementations of a row timed in
interleaved rounds (the machine may be shared; the minimum is the least disturbed run), torch at
--threads threads. "scores MB" is the largest score
tensor alive at once, f32: naive B*H*T*S*4, blocked B*H*block_q*block_k*4 (the
probabilities have the same shape, so about twice that is live).
"""

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from pallas_kernels.blocked_attention import (BLOCK_K, BLOCK_Q,  # noqa: E402
                                              DECODE_BLOCK_K, blocked_attention,
                                              blocked_decode_attention)
from pallas_kernels.decode_attention import decode_attention_reference  # noqa: E402
from pallas_kernels.flash_attention import flash_attention_reference  # noqa: E402

B, H, K, E = 1, 9, 3, 64


def timed(impls, iters):
    """{name: (min seconds, first-call seconds incl. compile, output)} of zero-argument callables,
    timed in interleaved rounds (one call of each per round), so that load from other jobs on a
    shared machine falls on all of them alike; the minimum is the least disturbed run."""
    first, outs = {}, {}
    for name, f in impls.items():
        start = time.perf_counter()
        outs[name] = jax.block_until_ready(f())
        first[name] = time.perf_counter() - start
    times = {name: [] for name in impls}
    for _ in range(iters):
        for name, f in impls.items():
            start = time.perf_counter()
            jax.block_until_ready(f())
            times[name].append(time.perf_counter() - start)
    return {name: (min(times[name]), first[name], outs[name]) for name in impls}


def max_err(out, ref):
    outs, refs = jax.tree.leaves(out), jax.tree.leaves(ref)
    return max(float(np.max(np.abs(np.asarray(o, np.float32) - np.asarray(r, np.float32))))
               for o, r in zip(outs, refs))


def prefill_rows(rows, name, T, S, q_offset, iters, torch, naive=True, grad=False):
    rng = np.random.default_rng(T + S)
    q = rng.standard_normal((B, T, H, E), np.float32)
    k, v = (rng.standard_normal((B, S, K, E), np.float32) for _ in range(2))
    do = rng.standard_normal((B, T, H, E), np.float32)
    kw = {} if q_offset is None else dict(q_offset=q_offset)

    def jax_fn(attn):
        if not grad:
            return jax.jit(lambda q, k, v: attn(q, k, v, **kw))
        return jax.jit(lambda q, k, v: jax.vjp(lambda *a: attn(*a, **kw), q, k, v)[1](do))

    args = [jnp.asarray(x) for x in (q, k, v)]
    tq, tk, tv = (torch.from_numpy(x.copy()).transpose(1, 2).contiguous() for x in (q, k, v))
    mask = None
    if T != S:  # torch's is_causal aligns top-left; ours aligns query i with key q_offset + i
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=q_offset)
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def torch_fn():
        if not grad:
            with torch.no_grad():
                return sdpa(tq, tk, tv, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        q_, k_, v_ = (x.detach().requires_grad_() for x in (tq, tk, tv))
        o = sdpa(q_, k_, v_, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        o.backward(torch.from_numpy(do).transpose(1, 2))
        return q_.grad, k_.grad, v_.grad

    blocked = f"blocked {min(BLOCK_Q, T)}x{min(BLOCK_K, S)}"
    impls = {blocked: functools.partial(jax_fn(blocked_attention), *args), "torch sdpa": torch_fn}
    if naive:
        impls = {"naive (reference)": functools.partial(jax_fn(flash_attention_reference), *args),
                 **impls}
    res = timed(impls, iters)
    ref = res["naive (reference)"][2] if naive else None
    for impl, (t, first, out) in res.items():
        err = float("nan") if ref is None or impl.startswith("torch") else max_err(out, ref)
        scores = {"naive (reference)": B * H * T * S * 4,
                  blocked: B * H * min(BLOCK_Q, T) * min(BLOCK_K, S) * 4}.get(impl, float("nan"))
        rows.append((name, impl, t, first, err, scores))


def decode_rows(rows, lengths, iters, torch, S=8192):
    Bd = len(lengths)
    rng = np.random.default_rng(len(lengths))
    q = rng.standard_normal((Bd, H, E), np.float32)
    k, v = (rng.standard_normal((Bd, S, K, E), np.float32) for _ in range(2))
    n = jnp.asarray(lengths, jnp.int32)
    name = f"decode B{Bd} S{S} len {','.join(map(str, lengths))}"
    args = [jnp.asarray(x) for x in (q, k, v)] + [n]
    L = max(lengths)
    tq = torch.from_numpy(q)[:, :, None]  # (B, H, 1, E)
    tk, tv = (torch.from_numpy(x[:, :L].copy()).transpose(1, 2).contiguous() for x in (k, v))
    mask = (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, None]

    def torch_fn():
        with torch.no_grad():
            return torch.nn.functional.scaled_dot_product_attention(
                tq, tk, tv, attn_mask=mask, enable_gqa=True)

    blocked = f"blocked {DECODE_BLOCK_K}"
    res = timed({
        "reference (whole cache)": functools.partial(jax.jit(
            lambda q, k, v, n: decode_attention_reference(q, k, v, lengths=n)), *args),
        blocked: functools.partial(jax.jit(
            lambda q, k, v, n: blocked_decode_attention(q, k, v, lengths=n)), *args),
        f"torch sdpa (cache cut to {L})": torch_fn}, iters)
    ref = res["reference (whole cache)"][2]
    for impl, (t, first, out) in res.items():
        err = float("nan") if impl.startswith("torch") else max_err(out, ref)
        scores = {"reference (whole cache)": Bd * H * S * 4,
                  blocked: Bd * H * DECODE_BLOCK_K * 4}.get(impl, float("nan"))
        rows.append((name, impl, t, first, err, scores))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rows")
    parser.add_argument("--naive-8192", action="store_true", help="run the naive 8192 row")
    parser.add_argument("--iters", type=int, default=5, help="timed runs per row")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    import torch
    torch.set_num_threads(args.threads)

    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({args.threads} threads), {os.cpu_count()} cpus, load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print(f"B={B} H={H} K={K} E={E} f32; blocks {BLOCK_Q}x{BLOCK_K}, decode {DECODE_BLOCK_K}")
    rows = []
    it = args.iters
    for T in (512, 2048) if args.quick else (512, 2048, 8192):
        prefill_rows(rows, f"prefill T=S={T}", T, T, None, it if T < 8192 else 2, torch,
                     naive=T < 8192 or args.naive_8192)
    prefill_rows(rows, "chunk T=512 @1536 S=2048", 512, 2048, 1536, it, torch)
    if not args.quick:
        prefill_rows(rows, "train fwd+bwd T=S=2048", 2048, 2048, None, max(2, it // 2), torch,
                     grad=True)
    for lengths in [[1000]] if args.quick else [[1000], [8000], [1000, 8000],
                                                [1000, 3000, 5000, 8000]]:
        decode_rows(rows, lengths, 3 * it, torch)

    torch_ms = {name: t for name, impl, t, *_ in rows if impl.startswith("torch")}
    header = (f"{'case':<42} {'impl':<30} {'ms':>9} {'torch/x':>8} {'1st call s':>10} "
              f"{'max err':>9} {'scores MB':>10}")
    print(header)
    print("-" * len(header))
    for name, impl, t, first, err, score_bytes in rows:
        print(f"{name:<42} {impl:<30} {t * 1e3:9.2f} {torch_ms[name] / t:8.2f} {first:10.2f} "
              f"{err:9.1e} {score_bytes / 1e6:10.1f}")
    print(f"load average {os.getloadavg()[0]:.1f} at end")


if __name__ == "__main__":
    main()
