"""Training Llama 3.1 8B and 70B at scale, compiled for H100s without a GPU (issue 24, part 2), and
fine-tuning the 8B with LoRA and QLoRA on one (issue 27).

    python benchmarks/train_at_scale.py [--out docs/TRAINING_AT_SCALE.md] [--no-sweep]

Needs the `gpu-check` extra (jax-cuda12-plugin/pjrt matching jaxlib, nvidia-cuda-nvcc-cu12), as
benchmarks/gpu_compile.py does. Both programs of a training step, the gradient
(`llama_jax.train.gradient_program`) and the optimizer update (clipping and AdamW from
`llama_jax.train.optimizer`, as the Trainer runs it), are compiled from abstract arrays for H100
topologies (`1x1x8`: one host of 8; `8x1x8`: 8 hosts of 8; `1x1x1`: one H100), so nothing is allocated. Per device it
reports the memory XLA assigned (`compiled.memory_analysis()`), FLOPs and bytes (XLA's HLO cost
analysis, loops counted their trip counts, the Pallas attention kernels' FLOPs added by hand), the
collectives by kind, and the roofline MFU. Exits 1 when a setup documented to fit (SETUPS, `fits`)
needs more than its budget on a device (80 GB; 24 GB for QLoRA), or does not compile.
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin would otherwise look for a GPU and fail loudly

import argparse
import collections
import dataclasses
import datetime
import functools
import importlib.metadata
import math
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

import llama_jax  # noqa: E402
from llama_jax import lora, train  # noqa: E402
from gpu_compile import H100_BYTES_PER_S, H100_FLOPS, TARGET, Hlo, train_mesh  # noqa: E402
from hlo_shapes import shape_bytes  # noqa: E402

HBM_BYTES = 80e9  # an H100 SXM's 80 GB, read as 80e9 bytes: stricter than its 80 GiB (85.9e9)
NVLINK_BYTES_PER_S = 450e9  # NVLink 4, one direction, per GPU: collectives inside a host
NIC_BYTES_PER_S = 50e9  # one 400 Gb/s InfiniBand NIC per GPU: collectives across hosts
PALLAS = llama_jax.RuntimeConfig(attention_impl="pallas", norm_impl="pallas")
# Matmuls each Pallas flash-attention kernel runs per visible (query, key) pair and head
# (pallas_kernels/flash_attention.py): forward QK^T, PV; dq: QK^T, dO V^T, dS K; dkv: QK^T, P^T dO,
# dO V^T, dS^T Q. HLO cost analysis counts a custom call as 0 FLOPs.
ATTENTION_MATMULS = {"flash_attention_fwd": 2, "flash_attention_dq": 3, "flash_attention_dkv": 4}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


@dataclasses.dataclass(frozen=True)
class Setup:
    """One training configuration: a model on `hosts` x `gpus` H100s, the make_mesh sizes, the
    TrainConfig (with lora_rank: LoRA, the model frozen). fits: documented to fit in `budget` bytes
    per device (None: HBM_BYTES, a whole H100; the run fails if it does not). quantize: the frozen
    model quantized as `llama_jax.load(quantize=...)` does (QLoRA)."""

    label: str
    config: llama_jax.LlamaConfig
    hosts: int
    gpus: int  # per host
    mesh: dict  # make_mesh sizes (fsdp=, tp=, ...); 'model' innermost, so tp stays inside a host
    train: train.TrainConfig
    fits: bool = True
    budget: float | None = None
    quantize: str | None = None

    @property
    def limit(self) -> float:
        return HBM_BYTES if self.budget is None else self.budget

    @property
    def topology(self) -> str:
        return f"{self.hosts}x1x{self.gpus}"

    @property
    def devices(self) -> int:
        return self.hosts * self.gpus


def _tc(batch_size, remat, seq_len=8192, **kw):
    return train.TrainConfig(seq_len=seq_len, batch_size=batch_size, compute_dtype="bfloat16", remat=remat,
                             scan_layers=True, **kw)


# Remat policies (docs/TRAINING_AT_SCALE.md has what each costs, from the sweep below). The 8B keeps
# the outputs of each layer's weight matmuls ("dots_with_no_batch_dims_saveable": q, k, v, wo, w1,
# w3, w2 products) and recomputes only the norms, the elementwise work and attention in the
# backward: with nothing saved it would recompute every matmul (4 forward passes of FLOPs instead of
# 3). The 70B saves nothing (remat=True): under tp=8 its saved matmul outputs (full [T, D] rows on
# every device after each all-reduce) leave it over 80 GB; what that frees buys a second row per
# fsdp group (batch 16), which halves the weight traffic per token.
REMAT_8B, REMAT_70B = "dots_with_no_batch_dims_saveable", True
# LoRA (issue 27) on one H100, rows of 4096 tokens, rank 16 on every projection. With a bf16 base
# (16 GB, frozen) nothing is recomputed: the backward needs no weight gradient, so XLA keeps fewer
# activations than the 8B policy above would save (the sweep shows that policy costing more). QLoRA
# (int4 base, 5.6 GB with the 8-bit embedding and head) recomputes each layer to fit in 24 GB, a
# consumer card's memory.
QLORA_BYTES = 24e9
LORA = dict(seq_len=4096, lora_rank=16)


def setups(sweep: bool = True) -> list[Setup]:
    """The documented setups (fits=True), then, with sweep, the alternatives tried (fits=False:
    reported, not required to fit)."""
    eight, seventy = llama_jax.LLAMA3_1_8B, llama_jax.LLAMA3_1_70B
    tp = dict(fsdp=8, tp=8)
    out = [Setup("Llama 3.1 8B, 8 H100, fsdp=8", eight, 1, 8, dict(fsdp=8), _tc(8, REMAT_8B)),
           Setup("Llama 3.1 70B, 64 H100 (8 hosts), fsdp=8 x tp=8", seventy, 8, 8, tp, _tc(16, REMAT_70B)),
           Setup("Llama 3.1 8B LoRA r16, bf16 base, 1 H100", eight, 1, 1, {}, _tc(1, False, **LORA)),
           Setup("Llama 3.1 8B QLoRA r16, int4 base, 1 H100 (24 GB budget)", eight, 1, 1, {}, _tc(1, True, **LORA),
                 budget=QLORA_BYTES, quantize="int4")]
    if sweep:
        out += [Setup("8B, remat=True", eight, 1, 8, dict(fsdp=8), _tc(8, True), fits=False),
                Setup("8B, remat=False", eight, 1, 8, dict(fsdp=8), _tc(8, False), fits=False),
                Setup("8B, batch 16 (2 rows per device)", eight, 1, 8, dict(fsdp=8), _tc(16, REMAT_8B), fits=False),
                Setup("70B, remat=dots_with_no_batch_dims_saveable", seventy, 8, 8, tp,
                      _tc(8, "dots_with_no_batch_dims_saveable"), fits=False),
                Setup("70B, batch 8 (1 row per fsdp group)", seventy, 8, 8, tp, _tc(8, REMAT_70B), fits=False),
                Setup("8B LoRA, remat=dots_with_no_batch_dims_saveable", eight, 1, 1, {},
                      _tc(1, "dots_with_no_batch_dims_saveable", **LORA), fits=False),
                Setup("8B QLoRA, remat=False", eight, 1, 1, {}, _tc(1, False, **LORA), fits=False,
                      budget=QLORA_BYTES, quantize="int4")]
    return out


# --- The target and the two programs ---------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def h100s(hosts: int, gpus: int):
    """The topology of `hosts` processes of `gpus` H100s each; its devices are compile targets."""
    return topologies.get_topology_desc(platform="cuda", target_config=TARGET.read_text(),
                                        topology=f"{hosts}x1x{gpus}")


def compile_on(mesh: Mesh, fn, args):
    """fn compiled for the devices the args' shardings name. Returns (compiled, seconds)."""
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = fn.trace(*args).lower().compile()
    return compiled, time.perf_counter() - t0


# --- Reading a compiled program ---------------------------------------------------------------------


def _split_top(text: str) -> list[str]:
    """'(a, (b, c))' -> ['a', '(b, c)']: the top-level parts of a tuple shape."""
    inner, parts, depth, start = text[1:-1], [], 0, 0
    for k, ch in enumerate(inner):
        depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(inner[start:k].strip())
            start = k + 1
    return parts + [inner[start:].strip()]


def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The device groups of a collective, from its replica_groups (the explicit `{{0,1},{2,3}}`,
    the iota `[G,S]<=[dims]T(perm)` or the mesh `mesh['axis_0'=8,'axis_1'=8] {'axis_0'}` form) or
    source_target_pairs; device ids are positions in the (iota) device assignment."""
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", line):
        axes = re.findall(r"'(\w+)'=(\d+)", m[1])
        names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
        over = [names.index(a) for a in re.findall(r"'(\w+)'", m[2])]
        keep = [k for k in range(len(names)) if k not in over]
        ids = np.arange(math.prod(sizes)).reshape(sizes).transpose(keep + over)
        return ids.reshape(-1, math.prod(sizes[k] for k in over)).tolist()
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line):
        dims = [int(d) for d in m[3].split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m[4]:
            ids = ids.transpose([int(p) for p in m[4].split(",")])
        return ids.reshape(int(m[1]), int(m[2])).tolist()
    if m := re.search(r"replica_groups=\{(\{[\d,{} ]*\})\}", line):
        groups = [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m[1])]
        return [g for g in groups if g] or [list(range(n_devices))]
    if m := re.search(r"source_target_pairs=\{([\d,{} ]*)\}", line):
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)\}", m[1])]
    return [list(range(n_devices))]


def walk(hlo: Hlo, comp: str, mult: int = 1):
    """(computation, instruction, executions per run) for comp and what it runs: loop bodies their
    known trip counts, the branches of a conditional and called computations once (an upper bound:
    one branch runs). Fusions are not entered."""
    for i in hlo.instrs[comp]:
        yield comp, i, mult
        if i.opcode == "while":
            for part in i.called("body"):
                yield from walk(hlo, part, mult * (i.trip_count or 1))
        elif i.opcode in ("conditional", "call", "async-start"):
            for attr in ("branch_computations", "true_computation", "false_computation", "to_apply", "calls"):
                for part in i.called(attr):
                    if part in hlo.instrs:
                        yield from walk(hlo, part, mult)


def collectives(hlo: Hlo, n_devices: int, gpus_per_host: int) -> dict:
    """{kind: dict(count, bytes, traffic, seconds)} per device per run. bytes: the whole buffer each
    moves (all-gather's result, reduce-scatter's operand, all-reduce's array); traffic: what a ring
    sends per device ((n-1)/n of the buffer; twice that for an all-reduce); seconds: traffic at NVLink
    speed inside a host, at the NIC's across hosts, run one after another (no overlap)."""
    out = {k: dict(count=0, bytes=0.0, traffic=0.0, seconds=0.0, across_hosts=0, dtypes=set()) for k in COLLECTIVES}
    for comp, i, n in walk(hlo, hlo.entry):
        op = i.opcode.removesuffix("-start")
        if op not in COLLECTIVES:
            continue
        if i.opcode.endswith("-start") and i.shape.startswith("((") or (
                op in ("all-gather", "reduce-scatter") and i.shape.startswith("(")):
            ins, outs = (shape_bytes(p) for p in _split_top(i.shape)[:2])  # (operands, results)
        else:
            ins = outs = shape_bytes(i.shape)
            if op in ("all-gather", "reduce-scatter"):
                ins = hlo.operand_bytes(comp, i)
        buf = max(ins, outs)
        groups = replica_groups(i.line, n_devices)
        size = max(len(g) for g in groups)
        if op == "collective-permute":
            traffic = buf
        else:
            traffic = buf * (size - 1) / size * (2 if op == "all-reduce" else 1)
        across = any(len({d // gpus_per_host for d in g}) > 1 for g in groups)
        row = out[op]
        row["count"] += n
        row["bytes"] += n * buf
        row["traffic"] += n * traffic
        row["seconds"] += n * traffic / (NIC_BYTES_PER_S if across else NVLINK_BYTES_PER_S)
        row["across_hosts"] += n * across
        row["dtypes"].update(re.findall(r"\b([a-z]+\d+)\[", i.shape))
    return {k: v for k, v in out.items() if v["count"]}


def attention_flops(hlo: Hlo) -> tuple[float, collections.Counter]:
    """FLOPs of the Pallas flash-attention kernels (custom calls, which HLO cost analysis counts as
    0), causal, from their shapes: q [B, T, H, E] (operand 2), k [B, S, K, E]; every query sees the
    keys at or before it (one document per row: packed documents let the kernels skip more).
    Returns (FLOPs, launches by kernel name)."""
    total, launches = 0.0, collections.Counter()
    for comp, i, n in walk(hlo, hlo.entry):
        name = re.findall(r'name = "(\w+)"', i.line) if i.opcode == "custom-call" else []
        if not name or name[0] not in ATTENTION_MATMULS:
            continue
        names = {j.name: j for j in hlo.instrs[comp]}
        args = re.findall(r"%([\w.\-]+)", i.line[i.line.index("custom-call(") + 12:].split(")")[0])
        shapes = [names[a].shape if a in names else "" for a in args]
        q = next(s for s in shapes if len(_dims(s)) == 4)  # the first 4-D operand: q [B, T, H, E]
        b, t, h, e = _dims(q)
        pairs = t * (t + 1) / 2  # causal, S = T in training
        total += n * ATTENTION_MATMULS[name[0]] * 2 * b * h * e * pairs
        launches[name[0]] += n
    return total, launches


def _dims(shape: str) -> tuple:
    arrays = re.findall(r"\[([\d,]*)\]", shape)
    return tuple(int(d) for d in arrays[-1].split(",") if d) if arrays else ()


def memory(compiled) -> dict:
    """Per-device bytes XLA assigned: arguments, outputs, temporaries, aliased (outputs written into
    donated arguments), and peak = arguments + outputs + temporaries - aliased."""
    m = compiled.memory_analysis()
    out = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, temps=m.temp_size_in_bytes,
               aliased=m.alias_size_in_bytes)
    out["peak"] = out["arguments"] + out["outputs"] + out["temps"] - out["aliased"]
    return out


def analyse(compiled, n_devices: int, gpus_per_host: int) -> dict:
    """A compiled program's per-device figures: memory, cost (FLOPs and bytes with loops counted
    their trip counts, attention kernels' FLOPs added), collectives."""
    hlo = Hlo(compiled)
    cost = hlo.cost(hlo.entry)  # HloCostAnalysis; each while body x its trip count; Pallas operands added
    attn, launches = attention_flops(hlo)
    return dict(memory=memory(compiled), xla_flops=cost["flops"], attention_flops=attn, flops=cost["flops"] + attn,
                bytes=cost["bytes"], collectives=collectives(hlo, n_devices, gpus_per_host), launches=launches)


# --- Arithmetic -----------------------------------------------------------------------------------


def roofline(flops: float, nbytes: float) -> dict:
    """The H100 roofline of work done in one program: FLOP time at 989 TFLOP/s (dense bf16), byte
    time at 3.35 TB/s, the bound max of the two, and MFU = FLOP time / bound."""
    ft, bt = flops / H100_FLOPS, nbytes / H100_BYTES_PER_S
    return dict(flop_s=ft, byte_s=bt, bound_s=max(ft, bt), mfu=ft / max(ft, bt) if max(ft, bt) else 0.0)


def model_flops(config: llama_jax.LlamaConfig, tc: train.TrainConfig, n_devices: int) -> float:
    """Model FLOPs of one step per device, what an MFU counts (no recomputation): 6 per weight of
    every matmul (the input embedding is a lookup) per token, plus causal attention at 3x its
    forward (4 B H E T(T+1)/2 per layer). With LoRA, 4 per frozen weight (forward and the input's
    gradient, no weight gradient) and 6 per adapter weight."""
    c = config
    per_layer = c.dim * c.n_heads * c.head_dim * 2 + c.dim * c.n_kv_heads * c.head_dim * 2 + 3 * c.dim * c.ffn_dim
    tokens = tc.batch_size * tc.grad_accum * tc.seq_len
    rows = tc.batch_size * tc.grad_accum
    lora_config = tc.lora()
    if lora_config is None:
        matmul = 6 * (c.n_layers * per_layer + c.dim * c.vocab_size) * tokens
    else:
        adapters = sum(math.prod(a.shape) for a in jax.tree.leaves(lora.shapes(c, lora_config)))
        matmul = (4 * (c.n_layers * per_layer + c.dim * c.vocab_size) + 6 * adapters) * tokens
    attention = 3 * c.n_layers * 4 * rows * c.n_heads * c.head_dim * tc.seq_len * (tc.seq_len + 1) / 2
    return (matmul + attention) / n_devices


def step_memory(grad: dict, update: dict, opt_state_bytes: int) -> dict:
    """Per-device peak of one step: the gradient program's peak plus the optimizer state, which stays
    resident while it runs (not its argument), and the update program's peak (params and state
    donated); the step's peak is the larger."""
    during_grad = grad["peak"] + opt_state_bytes
    return dict(during_grad=during_grad, during_update=update["peak"], peak=max(during_grad, update["peak"]))


def opt_state_bytes(args) -> int:
    """Per-device bytes of the update program's optimizer state argument."""
    return sum(int(np.prod(a.sharding.shard_shape(a.shape))) * a.dtype.itemsize for a in jax.tree.leaves(args[1]))


# --- One setup ----------------------------------------------------------------------------------------


def run(setup: Setup) -> dict:
    """Compiles both programs of one step of `setup` and returns its row of figures."""
    topo = h100s(setup.hosts, setup.gpus)
    mesh = train_mesh(topo, setup.mesh)
    row = dict(setup=setup)
    try:
        fn, args = train.gradient_program(setup.config, setup.train, mesh, PALLAS, quantize=setup.quantize)
        grad, row["grad_s"] = compile_on(mesh, fn, args)
        ufn, uargs = train.update_program(setup.config, setup.train, mesh, PALLAS)
        update, row["update_s"] = compile_on(mesh, ufn, uargs)
    except Exception as e:  # noqa: BLE001 -- a compile error is a finding: one line of it
        lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
        row["error"] = next((l for l in lines if re.search(r"RESOURCE_EXHAUSTED|INTERNAL|INVALID", l)), lines[0])[:300]
        return row
    row["grad"] = analyse(grad, setup.devices, setup.gpus)
    row["update"] = analyse(update, setup.devices, setup.gpus)
    row["opt_state"] = opt_state_bytes(uargs)
    row["memory"] = step_memory(row["grad"]["memory"], row["update"]["memory"], row["opt_state"])
    flops = row["grad"]["flops"] + row["update"]["flops"]
    g, u = (roofline(row[k]["flops"], row[k]["bytes"]) for k in ("grad", "update"))
    step_s = g["bound_s"] + u["bound_s"]  # the two programs run one after the other
    row.update(roof_grad=g, roof_update=u, step_s=step_s, mfu=(flops / H100_FLOPS) / step_s,
               model_flops=model_flops(setup.config, setup.train, setup.devices))
    row["model_mfu"] = (row["model_flops"] / H100_FLOPS) / step_s
    row["fits"] = row["memory"]["peak"] <= setup.limit
    return row


# --- The report -----------------------------------------------------------------------------------


def _gb(x: float) -> str:
    return f"{x / 1e9:.2f}"


def _remat(tc) -> str:
    return {True: "nothing saved", False: "off"}.get(tc.remat, tc.remat)


def table(rows: list[dict]) -> list[str]:
    out = ["| setup | tokens/step | remat | grad args / out / temp GB | update args / out / temp / aliased GB | "
           "opt state GB | peak GB (of budget) | TFLOP (XLA + attention) | GB accessed | roofline ms | MFU (roofline) | "
           "MFU (model FLOPs) | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["setup"]
        tokens = s.train.batch_size * s.train.grad_accum * s.train.seq_len
        if "error" in r:
            out.append(f"| {s.label} | {tokens} | {_remat(s.train)} | compile error: {r['error']} |" + " |" * 9)
            continue
        g, u, m = r["grad"]["memory"], r["update"]["memory"], r["memory"]
        flops = r["grad"]["flops"] + r["update"]["flops"]
        xla = r["grad"]["xla_flops"] + r["update"]["xla_flops"]
        peak = f"**{_gb(m['peak'])}** (of {s.limit / 1e9:.0f})" + ("" if r["fits"] else ", does not fit")
        out.append(
            f"| {s.label} | {tokens} | {_remat(s.train)} | {_gb(g['arguments'])} / {_gb(g['outputs'])} / "
            f"{_gb(g['temps'])} | {_gb(u['arguments'])} / {_gb(u['outputs'])} / {_gb(u['temps'])} / "
            f"{_gb(u['aliased'])} | {_gb(r['opt_state'])} | {peak} | {flops / 1e12:.1f} ({xla / 1e12:.1f} + "
            f"{(flops - xla) / 1e12:.1f}) | {(r['grad']['bytes'] + r['update']['bytes']) / 1e9:.1f} | "
            f"{r['step_s'] * 1e3:.1f} | {r['mfu']:.1%} | {r['model_mfu']:.1%} | "
            f"{r['grad_s']:.1f} + {r['update_s']:.1f} |")
    return out


def collective_table(rows: list[dict]) -> list[str]:
    out = ["| setup | program | collective | count | dtypes | buffers GB | ring traffic GB | of which across hosts | "
           "time if not overlapped ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            continue
        for prog in ("grad", "update"):
            for kind, c in sorted(r[prog]["collectives"].items()):
                dtypes = ", ".join(sorted(c["dtypes"]))
                out.append(f"| {r['setup'].label} | {prog} | {kind} | {c['count']} | {dtypes} | "
                           f"{_gb(c['bytes'])} | "
                           f"{_gb(c['traffic'])} | {c['across_hosts']} | {c['seconds'] * 1e3:.1f} |")
    return out


def detail(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if "error" in r:
            continue
        s, m, g, u = r["setup"], r["memory"], r["roof_grad"], r["roof_update"]
        comm = sum(c["seconds"] for p in ("grad", "update") for c in r[p]["collectives"].values())
        kernels = ", ".join(f"{k} x{n}" for k, n in sorted(r["grad"]["launches"].items()))
        out += [f"**{s.label}** ({s.topology}, mesh {s.mesh}, batch {s.train.batch_size} x {s.train.seq_len} "
                f"tokens, remat {_remat(s.train)}, loss_chunk {s.train.loss_chunk}):",
                f"- memory per device: {_gb(m['during_grad'])} GB while the gradient runs (its peak "
                f"{_gb(r['grad']['memory']['peak'])} + optimizer state {_gb(r['opt_state'])}), "
                f"{_gb(m['during_update'])} GB while the update runs.",
                f"- gradient: {r['grad']['flops'] / 1e12:.1f} TFLOP ({r['grad']['attention_flops'] / 1e12:.1f} of "
                f"them in the attention kernels: {kernels}), {r['grad']['bytes'] / 1e9:.1f} GB: "
                f"{g['flop_s'] * 1e3:.1f} ms of FLOPs, {g['byte_s'] * 1e3:.1f} ms of bytes. Update: "
                f"{r['update']['flops'] / 1e9:.1f} GFLOP, {r['update']['bytes'] / 1e9:.1f} GB: "
                f"{u['byte_s'] * 1e3:.1f} ms of bytes.",
                f"- model FLOPs ({'6' if s.train.lora_rank is None else '4 per frozen and 6 per adapter'} per weight "
                f"per token + attention, no recompute): "
                f"{r['model_flops'] / 1e12:.1f} TFLOP; collectives, if none overlapped compute: "
                f"{comm * 1e3:.0f} ms against a {r['step_s'] * 1e3:.0f} ms roofline step.", ""]
    return out


def report(rows: list[dict], total_s: float, cmd: str) -> str:
    versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "jax-cuda12-plugin", "optax"))
    chosen = [r for r in rows if r["setup"].fits]
    tried = [r for r in rows if not r["setup"].fits]
    out = ["# Training at scale, compiled to fit", "",
           f"Generated by `{cmd}` on {datetime.date.today()} ({versions}; target "
           f"`benchmarks/gpu/h100_sxm.txtpb`), in {total_s:.0f} s on this host. Do not edit by hand; the "
           "method is at the end.", "", CHOICES, "",
           "## The documented setups (each must fit in its budget per device: an H100's 80 GB, 24 GB for QLoRA)",
           ""]
    out += table(chosen) + [""] + detail(chosen)
    if tried:
        out += ["## Also tried (reported, not required to fit)", ""] + table(tried) + [""]
    out += ["## Collectives per device per step", ""] + collective_table(chosen) + [""]
    out += ["## Targets (issues 24 and 27)", ""] + targets(chosen) + ["", "## Method", "", METHOD]
    return "\n".join(out) + "\n"


def targets(rows: list[dict]) -> list[str]:
    """The issues' targets, read off the rows: every documented setup fits in its budget per device;
    the full 8B step's roofline MFU is at least 60%."""
    out = []
    for r in rows:
        label = r["setup"].label
        if "error" in r:
            out.append(f"- {label}: does not compile ({r['error']}): MISSED.")
            continue
        peak, limit = r["memory"]["peak"], r["setup"].limit
        out.append(f"- {label} fits in {limit / 1e9:.0f} GB per device: {_gb(peak)} GB, "
                   + ("met." if peak <= limit else f"MISSED by {_gb(peak - limit)} GB."))
        if r["setup"].config == llama_jax.LLAMA3_1_8B and r["setup"].train.lora_rank is None:
            out.append(f"- {label} roofline MFU at least 60%: {r['mfu']:.1%}, "
                       + ("met" if r["mfu"] >= 0.6 else "MISSED") + f" ({r['model_mfu']:.1%} counting model "
                       "FLOPs only).")
    return out


CHOICES = """\
Each setup trains with f32 master weights and AdamW state, bf16 matmuls, rows of 8192 tokens, the
Pallas kernels. **Remat**: the 8B keeps each layer's weight-matmul outputs
(`dots_with_no_batch_dims_saveable`) and recomputes the norms, the elementwise work and attention in
the backward; saving nothing would recompute every matmul (see its model-FLOP MFU below), saving
everything does not fit. The 70B saves nothing (`remat=True`): under tp=8 every device holds full
[T, D] activations after each tensor-parallel all-reduce, so its saved matmul outputs do not fit;
the memory that frees buys a second row per fsdp group (batch 16), which halves the weight
all-gathers per token. **Batch**: the 8B runs one row per device (a second does not fit with this
policy); the 70B two rows per fsdp group of 8 tensor-parallel devices. **LoRA** (rank 16 on q, k, v,
o, gate, up, down; rows of 4096 tokens; one H100): the model frozen in bf16 (or int4 with 8-bit
embedding and head, QLoRA), f32 adapters and AdamW state for them only. LoRA recomputes nothing:
with no weight gradient to compute, the backward needs fewer saved activations than the 8B's
policy keeps (see the sweep). QLoRA recomputes each layer (`remat=True`) to fit a 24 GB card:
without it, the backward keeps every layer's dequantized bf16 weights for the input's gradient."""


METHOD = """\
- **Target.** `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...,
  topology="1x1x8")` (one process, 8 H100s) or `"8x1x8"` (8 processes of 8: 64 H100s) with the
  project's `GpuTargetConfigProto` of an H100 SXM (benchmarks/gpu/h100_sxm.txtpb). The mesh is
  `gpu_compile.train_mesh`: the devices in order reshaped to (stage, data, fsdp, context, model), so
  'model' (tp) is innermost, inside a host, and 'fsdp' spans the hosts. Nothing is allocated: the
  arguments are `ShapeDtypeStruct`s placed on those devices.
- **The two programs of a step.** The gradient: `llama_jax.train.gradient_program(config,
  TrainConfig(compute_dtype="bfloat16", ...), mesh, RuntimeConfig(attention_impl="pallas",
  norm_impl="pallas"))`: f32 master weights, bf16 matmuls (f32 accumulation), the stacked layers
  under `lax.scan`, the Pallas flash attention and RMSNorm kernels, the chunked loss. The update:
  `train.optimizer(TrainConfig)` (torch's clipping, AdamW, numbers injected into the state) over the
  abstract f32 params and gradient, the moments placed as their parameters, the update skipped under
  `lax.cond` on a non-finite loss, params and state donated: `llama_jax.train.update_program`, the
  Trainer's own update program, its outputs pinned to the shardings of its inputs. (Before this
  report they were not, and XLA's sharding propagation through the `lax.cond` replicated them: a
  whole f32 copy of the weights and both moments on every device, 151 GB per device for the 8B and
  1,248 GB for the 70B, which could not have run.)
- **Memory per device**: `compiled.memory_analysis()` (XLA's buffer assignment): arguments, outputs,
  temporaries, and aliased (outputs written into donated arguments); a program's peak is arguments
  + outputs + temporaries - aliased. The step's peak is the larger of the gradient program's peak
  plus the optimizer state (resident while the gradient runs, though not its argument) and the
  update program's peak. 80 GB is read as 80e9 bytes (the card has 80 GiB = 85.9e9; the CUDA
  context, NCCL buffers and allocator fragmentation take some of the difference; JAX preallocates
  75% of it unless `XLA_PYTHON_CLIENT_MEM_FRACTION` says more).
- **FLOPs and bytes** per device: XLA's HloCostAnalysis (`_jax.hlo_module_cost_analysis`, a private
  API pinned by the gpu-check extra) of the compiled per-device module, through gpu_compile's
  `Hlo.cost`. The analysis counts a while loop's body once; the layer scan (and the loss's chunk
  scan) are therefore counted their known trip counts: cost = flat cost + n x body cost - body cost,
  recursively. It counts a Pallas call (a custom call) as 0 FLOPs; the harness adds each call's
  operand bytes, and here each flash-attention kernel's FLOPs from its shapes: 2 per (query, key)
  pair, head and head-dimension element per matmul, 2 matmuls in the forward kernel, 3 in dq, 4 in
  dkv, every query seeing the keys at or before it (T(T+1)/2 pairs: one document per row; packed
  documents let the kernels skip more blocks). The RMSNorm kernels' FLOPs are left out (negligible).
- **Roofline**: each program's time is max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s); the step is the
  gradient program then the update. MFU (roofline) = FLOP time / step time, as the issue defines
  it: recomputed FLOPs count. MFU (model FLOPs) divides instead 6 FLOPs per weight per token of
  every matmul (not the embedding lookup) plus causal attention at 3x its forward, by the device
  count: what the step must do, without recomputation or the flash kernels' extra matmuls. Neither
  counts communication; HLO bytes count every fusion's operands and results from HBM (no L2 reuse),
  so the byte time is an upper bound.
- **Collectives** per device, walking the entry computation, loop bodies counted their trip counts
  and both branches of a conditional once. Buffers: all-gather's result, reduce-scatter's operand,
  the array of the others. Ring traffic: (n-1)/n of the buffer for a group of n (twice that for an
  all-reduce). Groups come from `replica_groups`; a group spanning two hosts (device id // 8) is
  timed at 50 GB/s (one 400 Gb/s NIC per GPU), one inside a host at 450 GB/s (NVLink 4, one
  direction). The time assumes no overlap with compute: a bound on how much overlap must hide, not
  a prediction.
- **Not measured**: no GPU ran these programs; XLA cannot autotune its GEMMs without one; the
  figures are XLA's plan for the step, not timings."""


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="write the markdown report here")
    ap.add_argument("--no-sweep", action="store_true", help="only the documented setups, not the alternatives")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows, failures = [], []
    for s in setups(sweep=not args.no_sweep):
        row = run(s)
        rows.append(row)
        if "error" in row:
            line = f"{s.label}: compile error: {row['error']}"
        else:
            line = (f"{s.label}: peak {_gb(row['memory']['peak'])} GB per device, MFU {row['mfu']:.1%} (roofline), "
                    f"{row['model_mfu']:.1%} (model FLOPs), compiled in {row['grad_s'] + row['update_s']:.1f} s")
        print(line, flush=True)
        if s.fits and ("error" in row or row["memory"]["peak"] > s.limit):
            failures.append(line)
    total = time.perf_counter() - t0
    cmd = "python benchmarks/train_at_scale.py" + (" --no-sweep" if args.no_sweep else "") + (
        f" --out {args.out}" if args.out else "")
    text = report(rows, total, cmd)
    if args.out:
        Path(args.out).write_text(text)
    else:
        print("\n" + text)
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
