"""Context-parallel attention, all-gather of K/V vs ring, on 8 fake CPU devices (issue 14).

    python benchmarks/context_parallel.py              # T=8192, cp in (2, 4, 8): a few minutes on 2 cores
    python benchmarks/context_parallel.py --t 2048     # quicker

Shape: B=1, H=8 query heads, K=2 KV heads, E=64, f32; mesh make_mesh(cp=cp, tp=1), so cp devices
work and the inputs are in balanced order (llama_jax.context_parallel.balanced_order). Per cp and
method:
  fwd ms, fwd+bwd ms: jitted, compile excluded, the median of --iters runs after a warm-up. The
    fake devices share this machine's cores, so a time is the total work of all devices plus the
    collectives' copies, not what cp real accelerators would take.
  collective MB: per device per call, read from the compiled HLO (`.compile().as_text()`): the
    operand plus result bytes of every all-gather, reduce-scatter, all-reduce and
    collective-permute (all-reduces over groups of one device, the no-op psums shard_map's
    transpose inserts over mesh axes of size 1, are left out). The ring's loop is unrolled, so each
    step's permute is counted.
Then the work balance: per device, the (query, key) pairs a causal mask keeps, and the key blocks
blocked_attention visits (its defaults, 512 queries x 256 keys per block, mirroring its plan), for
the balanced layout (device i holds chunks i and 2cp-1-i) and a contiguous one (device i holds
tokens [i T/cp, (i+1) T/cp)).

Measured (T=8192, 2-core CPU shared with other jobs at load 12-14, so times are inflated and noisy):
  cp  method     fwd ms  fwd+bwd ms  fwd MB  f+b MB
   2  allgather    1329        6205   12.00   24.00
   2  ring         3013       12556    8.00   16.00
   4  allgather     637        5919   10.00   20.00
   4  ring         2679       18377   12.00   24.00
   8  allgather     985        5870    9.00   18.00
   8  ring         3144       16489   14.00   28.00
Bytes that cross the wire are the same for both (each device receives the other (cp-1)/cp of K and
V, and in the backward sends as much of dK, dV); in+out counts the gathered copy for all-gather and
each of the ring's cp-1 steps twice. The ring's time is mostly its plain-jnp block attention, slower
than blocked_attention on CPU. The balanced layout gives every device the same work (max/min 1.00);
contiguous gives 3.0x / 7.0x / 15x more causal pairs to the last device at cp=2 / 4 / 8.
"""

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import llama_jax  # noqa: E402
from llama_jax import context_parallel as cpa  # noqa: E402
from llama_jax import sharding  # noqa: E402
from pallas_kernels.blocked_attention import BLOCK_K, BLOCK_Q  # noqa: E402
from hlo_shapes import shape_bytes  # noqa: E402

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute")


def collective_bytes(hlo: str) -> tuple[int, dict]:
    """(operand + result bytes of every collective, {kind: count}) in a compiled HLO module's text."""
    types, calls = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%([\w.\-]+) = (.*)", line)
        if not m:
            continue
        name, rest = m.groups()
        if rest.startswith("("):  # a tuple type: up to its closing parenthesis
            depth = 0
            for j, ch in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(ch, 0)
                if depth == 0:
                    break
            typ, rest = rest[:j + 1], rest[j + 2:]
        else:
            typ, _, rest = rest.partition(" ")
        types[name] = typ
        op = rest.split("(", 1)[0]
        kind = op.removesuffix("-start")
        if kind in COLLECTIVES:
            groups = re.search(r"replica_groups=\{(.*?)\}\}?,", rest)
            if kind == "all-reduce" and groups and re.fullmatch(r"(\{\d+\},?)+\}?", groups.group(1) + "}"):
                continue  # groups of one device: nothing moves
            args = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
            calls.append((kind, typ, args))
    total, counts = 0, {}
    for kind, typ, args in calls:
        total += shape_bytes(typ) + sum(shape_bytes(types.get(a, "")) for a in args)
        counts[kind] = counts.get(kind, 0) + 1
    return total, counts


def visited_key_blocks(q_off: int, n_q: int, kv_len: int, t: int) -> int:
    """Key blocks blocked_attention computes for n_q causal queries at q_off over kv_len keys
    (its _plan without segments: per query block, ceil(min(kv_len, last query + 1) / block_k))."""
    bq, bk = min(BLOCK_Q, n_q), min(BLOCK_K, t)
    return sum(-(-min(kv_len, q_off + min(t0 + bq, n_q)) // bk) for t0 in range(0, n_q, bq))


def balance(t: int, cp: int) -> dict:
    c, shard = t // (2 * cp), t // cp
    bal = cpa.balanced_order(t, cp).reshape(cp, -1)
    return {
        "pairs balanced": [(bal[i] + 1).sum() for i in range(cp)],
        "pairs contiguous": [(np.arange(i * shard, (i + 1) * shard) + 1).sum() for i in range(cp)],
        "blocks balanced": [sum(visited_key_blocks(ch * c, c, (ch + 1) * c, t)
                                for ch in (i, 2 * cp - 1 - i)) for i in range(cp)],
        "blocks contiguous": [visited_key_blocks(i * shard, shard, (i + 1) * shard, t) for i in range(cp)],
    }


def timed(compiled, args, iters: int) -> float:
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def run(t: int, cp: int, method: str, iters: int) -> dict:
    b, h, kh, e = 1, 8, 2, 64
    mesh = llama_jax.make_mesh(cp=cp, tp=1)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    shapes = [(b, t, h, e), (b, t, kh, e), (b, t, kh, e), (b, t, h, e)]
    axes = [("batch", "seq", "q_heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim")] * 2
    axes = [axes[0], axes[1], axes[1], axes[0]]
    args = [jax.device_put(jax.random.normal(k, s, jnp.float32),
                           NamedSharding(mesh, sharding.logical_to_mesh(a, s, mesh)))
            for k, s, a in zip(keys, shapes, axes)]
    attend = lambda q, k, v: cpa.attention(q, k, v, method=method)  # noqa: E731
    fwd = jax.jit(attend)
    both = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    row = {}
    with jax.set_mesh(mesh):
        for name, f, a in (("fwd", fwd, args[:3]), ("fwd+bwd", both, args)):
            t0 = time.perf_counter()
            compiled = f.lower(*a).compile()
            row[name + " compile s"] = time.perf_counter() - t0
            row[name + " ms"] = timed(compiled, a, iters)
            row[name + " MB"], row[name + " ops"] = collective_bytes(compiled.as_text())
            row[name + " MB"] /= 2**20
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--t", type=int, default=8192)
    ap.add_argument("--cp", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--iters", type=int, default=3)
    args = ap.parse_args()
    print(f"T={args.t} B=1 H=8 K=2 E=64 f32, {jax.device_count()} fake CPU devices, median of {args.iters}")
    print(f"{'cp':>3} {'method':>9} {'fwd ms':>9} {'fwd+bwd ms':>11} {'fwd MB':>8} {'f+b MB':>8}  collectives (fwd+bwd)")
    for cp in args.cp:
        for method in ("allgather", "ring"):
            r = run(args.t, cp, method, args.iters)
            ops = ", ".join(f"{k} x{n}" for k, n in sorted(r["fwd+bwd ops"].items()))
            print(f"{cp:>3} {method:>9} {r['fwd ms']:>9.0f} {r['fwd+bwd ms']:>11.0f} {r['fwd MB']:>8.2f} "
                  f"{r['fwd+bwd MB']:>8.2f}  {ops}", flush=True)
    print(f"\nwork per device (T={args.t}): causal (query, key) pairs and blocked_attention key blocks "
          f"({BLOCK_Q}x{BLOCK_K}); max/min over devices")
    for cp in args.cp:
        bal = balance(args.t, cp)
        for name, per in bal.items():
            print(f"  cp={cp} {name:>17}: {' '.join(str(int(x)) for x in per)}  (max/min {max(per) / min(per):.2f})")


if __name__ == "__main__":
    main()
