"""The training step on each parallel mesh (issue #14): time, memory per device, collective traffic.

    python benchmarks/parallel.py [--steps 5] [--seq-len 256] [--batch-size 8] [--meshes dp8,cp4_tp2]
    python benchmarks/parallel.py --config llama3.2-1b      # on a host with 8 real accelerators

One row per mesh (make_mesh arguments), plus one device as the baseline. On a CPU host the 8
devices are fake (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here before jax starts):
they share the host's cores, so step times compare programs, not hardware. Columns:
- step ms: median of --steps full optimizer steps (Trainer.step) after one warm-up step;
  tokens/s: batch x seq over it.
- state MB/dev: weights + AdamW state on the busiest device, from the arrays' shardings.
- temp MB/dev: the compiled gradient program's temporaries (activations, remat buffers,
  collective buffers): memory_analysis().temp_size_in_bytes, per device.
- collectives, MB per device per step, read from the compiled HLO of both programs ("grads" and
  "update", Trainer.lower): the sum of the result shapes of each op kind, an op in a loop body
  counted times the loop's trip count (scanned layers, pipeline ticks; a row notes a loop whose
  trip count could not be read, counted once). XLA CPU may lower a
  reduce-scatter as an all-reduce plus a slice: read reduce-scatter + all-reduce together there.
  n ops: how many collectives a step runs (each one waits for every device of its group).
A mesh that fails (not wired yet, or not divisible) prints its error's first line in its row.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from hlo_shapes import shape_bytes  # noqa: E402

MESHES = {  # name -> make_mesh arguments; None: one device, no mesh
    "single": None,
    "dp8": dict(dp=8, tp=1),
    "fsdp4_tp2": dict(fsdp=4, tp=2),
    "cp4_tp2": dict(cp=4, tp=2),
    "pp2_dp4": dict(pp=2, dp=4, tp=1),
    "pp2_cp2_tp2": dict(pp=2, cp=2, tp=2),
}
# The tests' tiny config (tests/test_parallel.py) scaled up until a CPU step takes a fraction of a
# second: 4 layers (2 stages), 8 query / 2 KV heads (tp=2), every split dimension divisible by 8.
SMALL = dict(vocab_size=2048, dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=688, head_dim=32,
             max_seq_len=1024, rope_theta=10000.0, bos_id=1, eos_ids=(2,))
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "collective-permute", "all-to-all")
_KEYS = COLLECTIVES + ("ops",)
_INSTR = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) ([a-z][a-z0-9\-]*)\(")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def collective_bytes(hlo: str) -> tuple[dict, bool]:
    """({op kind: bytes per run of the module, "ops": how many collectives run}, whether every loop holding a collective had a known
    trip count) from a compiled module's HLO text. Async pairs count once, at their "-done" op (whose
    result is the collective's result); a conditional counts its costliest branch."""
    comps, current = {}, None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:  # a computation starts (instructions are indented)
            current = comps.setdefault(m.group(1), [])
        elif current is not None and line.strip() not in ("", "}"):
            current.append(line)
    entry = next((m.group(1) for line in hlo.splitlines() if line.startswith("ENTRY")
                  for m in [_HEADER.match(line)] if m), None)
    exact = [True]

    def trip_count(line: str) -> int | None:
        """The loop's trip count: XLA's known_trip_count when it wrote one (GPU does, CPU does not),
        else the one integer constant its condition compares with (a scan counts up from 0)."""
        known = _TRIP.search(line)
        if known:
            return int(known.group(1))
        cond = re.search(r"condition=%?([\w.\-]+)", line).group(1)
        lines = list(comps.get(cond, ()))
        for callee in re.findall(r"calls=%?([\w.\-]+)", "\n".join(lines)):
            lines += comps.get(callee, ())
        consts = set(re.findall(r"[su](?:32|64)\[\] constant\((\d+)\)", "\n".join(lines)))
        return int(consts.pop()) if len(consts) == 1 else None

    @functools.lru_cache(maxsize=None)
    def cost(name: str) -> tuple:
        total = dict.fromkeys(_KEYS, 0)

        def add(other, times=1):
            for k in _KEYS:
                total[k] += times * other[k]

        for line in comps.get(name, ()):
            m = _INSTR.match(line)
            if not m:
                continue
            shape, op = m.groups()
            kind = op[:-len("-done")] if op.endswith("-done") else op
            if kind in COLLECTIVES and not op.endswith("-start"):
                total[kind] += shape_bytes(shape)
                total["ops"] += 1
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", line).group(1)
                trip = trip_count(line)
                sub = dict(zip(_KEYS, cost(body)))
                if trip is None and sub["ops"]:
                    exact[0] = False
                add(sub, trip or 1)
            elif op == "conditional":
                listed = re.search(r"branch_computations=\{([^}]*)\}", line)
                branches = (re.findall(r"%?([\w.\-]+)", listed.group(1)) if listed
                            else re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
                costs = [dict(zip(_KEYS, cost(b))) for b in branches]
                if costs:
                    add(max(costs, key=lambda c: sum(c[k] for k in COLLECTIVES)))
            else:  # a call, or an async wrapper (GPU); fusions and reductions hold no collectives
                callees = re.findall(r"to_apply=%?([\w.\-]+)", line) if op == "call" else \
                    re.findall(r"calls=%?([\w.\-]+)", line) if op != "fusion" else []
                for callee in callees:
                    add(dict(zip(_KEYS, cost(callee))))
        return tuple(total[k] for k in _KEYS)

    return dict(zip(_KEYS, cost(entry))) if entry else dict.fromkeys(_KEYS, 0), exact[0]


def _state_bytes_per_device(trainer) -> int:
    per_device = {}
    import jax

    for a in jax.tree.leaves((trainer.params, trainer.opt_state)):
        for shard in a.addressable_shards:
            per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
    return max(per_device.values())


def _batch(vocab: int, batch_size: int, seq_len: int) -> dict:
    """Packed rows of random documents (several per row), exactly batch_size rows."""
    from llama_jax.data import pack_documents

    rng = np.random.default_rng(0)
    docs = []
    while sum(len(d) for d in docs) < 2 * batch_size * seq_len:
        docs.append([1, *rng.integers(3, vocab, int(rng.integers(8, seq_len))).tolist(), 2])
    rows = pack_documents(docs, seq_len)
    return {k: np.resize(v, (batch_size, seq_len)) for k, v in rows.items()}


def measure(mesh_args: dict | None, config, args) -> dict:
    import jax

    import llama_jax
    from llama_jax.train import Trainer, TrainConfig

    mesh = None if mesh_args is None else llama_jax.make_mesh(**mesh_args)
    train = TrainConfig(seq_len=args.seq_len, batch_size=args.batch_size, peak_lr=1e-4, warmup_steps=0,
                        total_steps=1000, compute_dtype=args.compute_dtype, remat=args.remat)
    f32 = llama_jax.RuntimeConfig(param_dtype="float32", dtype="float32")
    trainer = Trainer(llama_jax.from_config(config, f32, seed=0, mesh=mesh), train)
    batch = _batch(config.vocab_size, args.batch_size, args.seq_len)
    lowered = trainer.lower(batch)
    compiled = {k: v.compile() for k, v in lowered.items()}
    temp = compiled["grads"].memory_analysis().temp_size_in_bytes
    coll, exact = dict.fromkeys(_KEYS, 0), True
    for c in compiled.values():
        b, e = collective_bytes(c.as_text())
        coll = {k: coll[k] + b[k] for k in _KEYS}
        exact &= e
    trainer.step(batch)  # warm-up (compiles the step)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.step(batch)
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    out = {"step_s": step, "tokens_s": args.batch_size * args.seq_len / step,
           "state": _state_bytes_per_device(trainer), "temp": temp, "coll": coll, "exact": exact}
    del trainer, lowered, compiled
    jax.clear_caches()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per mesh (median), after one warm-up")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8, help="rows per step (global)")
    p.add_argument("--meshes", default=",".join(MESHES), help=f"comma-separated subset of {','.join(MESHES)}")
    p.add_argument("--config", default=None, help="a llama_jax.PRESETS name (random weights); default: a small one")
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"),
                   help="default: float32 on CPU, bfloat16 elsewhere")
    p.add_argument("--remat", action="store_true", help="recompute each layer in the backward")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.meshes.split(",") if n.strip()]
    unknown = [n for n in names if n not in MESHES]
    if unknown:
        p.error(f"unknown meshes {unknown}; known: {list(MESHES)}")

    import jax

    import llama_jax

    if args.config is None:
        config = llama_jax.LlamaConfig(**SMALL)
    elif args.config in llama_jax.PRESETS:
        config = llama_jax.PRESETS[args.config]
    else:
        p.error(f"unknown --config {args.config!r}; known: {sorted(llama_jax.PRESETS)}")
    config = dataclasses.replace(config, max_seq_len=max(config.max_seq_len, args.seq_len))
    devices = jax.devices()
    print(f"{args.config or 'small'} ({config.n_layers} layers, dim {config.dim}), batch {args.batch_size} x "
          f"seq {args.seq_len}, {len(devices)} x {devices[0].device_kind}, jax {jax.__version__}, "
          f"median of {args.steps} steps; memory and collectives in MB per device (collectives per step)", flush=True)
    mb = 2**20
    head = (f"{'mesh':<13}{'step ms':>9}{'tokens/s':>10}{'state MB':>10}{'temp MB':>9}"
            f"{'all-gather':>11}{'red-scat':>10}{'all-red':>9}{'c-permute':>10}{'all2all':>9}{'n ops':>7}")
    print(head + "\n" + "-" * len(head), flush=True)
    for name in names:
        try:
            r = measure(MESHES[name], config, args)
        except Exception as e:  # a mesh that is not wired or does not fit: its row says why
            msg = (str(e).strip().splitlines() or [""])[0]
            print(f"{name:<13}FAILED {type(e).__name__}: {msg[:160]}", flush=True)
            jax.clear_caches()
            continue
        c = r["coll"]
        print(f"{name:<13}{r['step_s'] * 1e3:>9.1f}{r['tokens_s']:>10.0f}{r['state'] / mb:>10.2f}{r['temp'] / mb:>9.2f}"
              f"{c['all-gather'] / mb:>11.2f}{c['reduce-scatter'] / mb:>10.2f}{c['all-reduce'] / mb:>9.2f}"
              f"{c['collective-permute'] / mb:>10.2f}{c['all-to-all'] / mb:>9.2f}{c['ops']:>7}"
              + ("" if r["exact"] else "  (a loop of unknown trip count: counted once)"), flush=True)


if __name__ == "__main__":
    sys.exit(main())
