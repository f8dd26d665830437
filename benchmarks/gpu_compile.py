"""Compile every Pallas kernel and the whole Llama programs for an H100, on a CPU-only host.

    python benchmarks/gpu_compile.py [--quick] [--out docs/GPU_COMPILE.md] [--no-fail] [--jobs N]

Needs the `gpu-check` extra (jax-cuda12-plugin/pjrt matching jaxlib, and nvidia-cuda-nvcc-cu12 for
ptxas); `make gpu-check` installs it into its own venv. With an H100 target description
(benchmarks/gpu/h100_sxm.txtpb), `jit(f).trace(...).lower().compile()` runs the whole XLA GPU
pipeline here: Pallas -> Triton -> PTX -> cubin through the real ptxas (FACTS.md, issue 15).

Per kernel: registers, spills and stack (`ptxas -v` on each dumped PTX), grid, warps and shared
memory per launch (the thunk sequence XLA dumps). Per program: compile time, kernels launched per
decode step, collectives in the decode loop, FLOPs and bytes of one decode step from XLA's HLO cost
analysis, the H100 roofline, and bytes against the minimum (weights + KV cache); the bytes of a
speculative decoding verify call against one decode step (issue 26). Failures (one line
each) make the exit status 1; with --expected FILE, failures listed there do not, but a listed one
that no longer happens does, so the list only shrinks (`make gpu-check` passes
benchmarks/gpu/expected_failures.txt).
"""

from __future__ import annotations

import os

os.environ["JAX_PLATFORMS"] = "cpu"  # the CUDA plugin would otherwise look for a GPU and fail loudly

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import glob
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax._src.lib import _jax  # XLA's HLO cost analysis: a private API, pinned by the gpu-check extra
from jax.experimental import topologies
from jaxlib import _hlo
from jax.sharding import Mesh, PartitionSpec as P, SingleDeviceSharding

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

import llama_jax  # noqa: E402
import pallas_kernels as pk  # noqa: E402
from pallas_kernels.mosaic import flash_attention_mosaic, quant_matmul_mosaic  # noqa: E402
from llama_jax import engine, generate, quant, runner, scheduler, sharding, train  # noqa: E402
from llama_jax import model as model_lib  # noqa: E402
from llama_jax.api import inference_layout  # noqa: E402
from llama_jax.model import KVCache  # noqa: E402
from llama_jax.sharding import PAGE_AXES  # noqa: E402
from llama_jax.speculative import SpeculativeConfig  # noqa: E402
from hlo_shapes import shape_bytes  # noqa: E402

TARGET = ROOT / "benchmarks" / "gpu" / "h100_sxm.txtpb"
OUR_KERNELS = ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv", "decode_attention",
               "paged_decode_attention", "rms_norm_fwd", "rms_norm_bwd", "quant_matmul")
# Name prefixes of the Mosaic GPU kernels (they compile outside XLA's dump: see mosaic_stats).
MOSAIC_KERNELS = ("mosaic_flash_attention_", "mosaic_quant_matmul_")
H100_SMEM = 227 * 1024  # opt-in shared memory per block
H100_FLOPS, H100_BYTES_PER_S = 989e12, 3.35e12  # dense bf16, HBM3
BYTES_SLACK = 1.05  # a decode step may read 5% more than weights + KV cache
# Speculative decoding (issue 26): a verify call of K proposals may read 10% more than one decode
# step, so that each kept proposal is a token almost free of weight reads.
SPEC_K = SpeculativeConfig.num_speculative_tokens  # the engine's default K
VERIFY_SLACK = 1.1
Failure = collections.namedtuple("Failure", "key detail")
# Mosaic GPU reads where to dump its kernels from the environment as it compiles them: one compile
# that may hold Mosaic kernels at a time, so that a case's dump holds its own kernels only.
MOSAIC_COMPILES = threading.Lock()


# --- The target ------------------------------------------------------------------------------------


def h100(n_gpus: int = 1):
    """The H100 topology (one host with n_gpus); its .devices are compile targets, not devices."""
    return topologies.get_topology_desc(platform="cuda", target_config=TARGET.read_text(),
                                        topology=f"1x1x{n_gpus}")


def compile_for(fn, args, dump_dir):
    """jit(fn) compiled for the target the args' shardings name. Returns (compiled, seconds)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).trace(*args).lower().compile(
        compiler_options={"xla_dump_to": str(dump_dir), "xla_dump_hlo_as_text": True})
    return compiled, time.perf_counter() - t0


def _error_line(e: Exception) -> str:
    """The line of a compile error that says what went wrong (e.g. the shared-memory limit)."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [""]
    status = r"RESOURCE_EXHAUSTED|INTERNAL|INVALID_ARGUMENT|UNIMPLEMENTED"
    line = next((l for l in lines if re.search(status, l)), lines[0])
    return (line if type(e).__name__ == "JaxRuntimeError" else f"{type(e).__name__}: {line}")[:300]


# --- ptxas and the thunk sequence ------------------------------------------------------------------


def ptxas_path() -> str:
    """The ptxas of the nvidia-cuda-nvcc-cu12 wheel (XLA uses the same one)."""
    import nvidia.cuda_nvcc
    for base in nvidia.cuda_nvcc.__path__:
        if os.path.isfile(p := os.path.join(base, "bin", "ptxas")):
            return p
    raise FileNotFoundError("ptxas not found: install the gpu-check extra (nvidia-cuda-nvcc-cu12)")


def ptxas_version() -> str:
    out = subprocess.run([ptxas_path(), "--version"], capture_output=True, text=True).stdout
    return (re.findall(r"release ([\d.]+), (V[\d.]+)", out) or [("?", "?")])[0][1]


def ptxas_stats(dump_dir, names=OUR_KERNELS) -> dict:
    """{kernel: {registers, spill_stores, spill_loads, stack}} for each dumped PTX whose entry
    function starts with one of `names`, from `ptxas -v -arch=sm_90a`."""
    stats = {}
    for ptx in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        entries = re.findall(r"\.entry\s+(\w+)\s*\(", Path(ptx).read_text())
        if not any(e.startswith(names) for e in entries):
            continue
        out = subprocess.run([ptxas_path(), "-v", "-arch=sm_90a", ptx, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        for fn, body in re.findall(r"Compiling entry function '(\w+)'.*?\n(.*?Used \d+ registers)", out, re.S):
            (stack, st, ld), = re.findall(
                r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
            regs, = re.findall(r"Used (\d+) registers", body)
            stats[fn] = dict(registers=int(regs), spill_stores=int(st), spill_loads=int(ld), stack=int(stack))
    return stats


@dataclasses.dataclass
class Thunk:
    id: int
    kind: str
    name: str  # kernel name for kernel thunks
    grid: tuple = ()
    threads: tuple = ()
    smem: int = 0
    children: list = dataclasses.field(default_factory=list)  # nested thunks (e.g. a slice's copy)
    cond: list = dataclasses.field(default_factory=list)  # kWhile only
    body: list = dataclasses.field(default_factory=list)


_THUNK = re.compile(r"^(\s*)(\d+): (\w+)\s+\[[^\]]*\]\s*(\S*)(.*)$")


def read_thunks(dump_dir) -> tuple[list[Thunk], dict]:
    """The thunk tree of the (only) module in dump_dir, and {thunk id: HLO instruction name}."""
    text = Path(glob.glob(os.path.join(dump_dir, "*.thunk_sequence.txt"))[0]).read_text()
    root: list[Thunk] = []
    stack = [(-1, root)]  # (indent, list that thunks at a deeper indent go into)
    last_while, open_conds = None, []
    for line in text.splitlines():
        marker = line.strip()
        if marker in ("condition:", "body:"):
            w, indent = last_while if marker == "condition:" else open_conds.pop()
            if marker == "condition:":
                open_conds.append((w, indent))
            while stack[-1][0] > indent:
                stack.pop()
            stack[-1] = (indent, w.cond if marker == "condition:" else w.body)
            continue
        m = _THUNK.match(line)
        if not m:
            continue
        indent, tid, kind, name, rest = len(m[1]), int(m[2]), m[3], m[4], m[5]
        smem = re.findall(r"shared_memory: (\d+)", rest)
        t = Thunk(tid, kind, name, _dims3("grid", rest), _dims3("threads", rest), int(smem[0]) if smem else 0)
        while stack[-1][0] >= indent:
            stack.pop()
        stack[-1][1].append(t)
        stack.append((indent, t.children))
        if kind == "kWhile":
            last_while = (t, indent)
    meta = Path(glob.glob(os.path.join(dump_dir, "*.thunk_metadata.txt"))[0]).read_text()
    names = {int(i): a for a, i in re.findall(r'profile_annotation: "([^"]+)"\s+thunk_id: (\d+)', meta)}
    return root, names


def _dims3(key: str, text: str) -> tuple:
    """'grid: [8, 2, 32]' -> (8, 2, 32)."""
    m = re.search(key + r": \[([^\]]*)\]", text)
    return tuple(int(x) for x in re.findall(r"\d+", m[1])) if m else ()


def launches(thunks, trip_count=lambda t: 1) -> collections.Counter:
    """Launches per run of `thunks`, by kind ('kernel', 'copy', 'collective') and by kernel name
    (('kernel', name)); a while loop counts its body trip_count(thunk) times (its condition once more)."""
    c = collections.Counter()
    for t in thunks:
        if t.kind == "kWhile":
            n = trip_count(t)
            for k, v in launches(t.body, trip_count).items():
                c[k] += n * v
            for k, v in launches(t.cond, trip_count).items():
                c[k] += (n + 1) * v
        elif t.children:
            c.update(launches(t.children, trip_count))
        elif t.kind in ("kCustomKernel", "kKernel", "kGemm", "kCublasLtMatmul", "kCuDnn", "kTriton"):
            c["kernel"] += 1
            c[("kernel", t.name if t.kind != "kGemm" else "cublas_gemm")] += 1
        elif t.kind in ("kCopy", "kMemset32BitValue", "kMemzero"):
            c["copy"] += 1
        elif re.match(r"k(All|Reduce|Collective|Nccl|Ragged)", t.kind):
            c["collective"] += 1
    return c


# --- Optimized HLO: computations, bytes, and XLA's cost analysis -----------------------------------

_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all",
                "ragged-all-to-all")
# Instructions that only move or reformat data; one of these writing a whole weight or KV cache per
# step is a copy the decode step should not make.
_MOVES = {"copy", "pad", "transpose", "concatenate", "broadcast", "slice", "dynamic-slice", "convert",
          "reverse", "gather"}
_VIEWS = {"parameter", "constant", "bitcast", "reshape", "get-tuple-element", "tuple", "iota"}


def _split_shape(text: str) -> tuple[str, str]:
    """'(f32[2], s32[]) tuple(...)' -> ('(f32[2], s32[])', 'tuple(...)'): a shape may be a tuple."""
    if not text.startswith("("):
        shape, _, rest = text.partition(" ")
        return shape, rest
    depth = 0
    for i, ch in enumerate(text):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            return text[: i + 1], text[i + 2:]
    return text, ""


def _dims(shape: str) -> tuple:
    arrays = re.findall(r"\b[a-z]+\d*[a-z0-9]*\[([\d,]*)\]", shape)
    return tuple(int(d) for d in arrays[-1].split(",") if d) if arrays else ()


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    line: str

    def called(self, attr: str) -> list[str]:
        return re.findall(attr + r"=\{?%?([\w.\-]+)", self.line) + (
            re.findall(r"%([\w.\-]+)", (re.findall(attr + r"=\{([^}]*)\}", self.line) or [""])[0]))

    @property
    def trip_count(self) -> int | None:
        n = re.findall(r'"known_trip_count":\{"n":"(\d+)"', self.line)
        return int(n[0]) if n else None


class Hlo:
    """The optimized HLO of a compiled program, cut into computations (text and instructions)."""

    def __init__(self, compiled):
        opts = _hlo.HloPrintOptions()
        opts.print_metadata = False
        opts.print_large_constants = True  # so that a computation cut out of it parses again
        self.text = compiled.runtime_executable().hlo_modules()[0].to_string(opts)
        self.comps, self.instrs, self.entry = {}, {}, None
        current = None
        for line in self.text.splitlines():
            if m := re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line):
                current = m[2]
                self.comps[current] = [line[len(m[1] or ""):]]
                self.instrs[current] = []
                self.entry = current if m[1] else self.entry
            elif current is not None:
                self.comps[current].append(line)
                if m := re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = ", line):
                    shape, rest = _split_shape(line[m.end():])
                    self.instrs[current].append(Instr(m[1], shape, re.match(r"[\w\-]*", rest)[0], line))
                if line == "}":
                    current = None
        self.by_name = {i.name: i for instrs in self.instrs.values() for i in instrs}
        self._flat_costs = {}  # flat_cost of each computation analysed (cost() asks for a loop's twice)

    def callees(self, comp: str) -> set[str]:
        """Every computation comp calls, transitively (fusions, reducers, loop bodies, both branches
        of a conditional)."""
        out, todo = set(), [comp]
        while todo:
            for i in self.instrs[todo.pop()]:
                for attr in ("calls", "to_apply", "body", "condition", "branch_computations", "called_computations",
                             "true_computation", "false_computation"):
                    for c in i.called(attr):
                        if c in self.comps and c not in out:
                            out.add(c)
                            todo.append(c)
        return out

    def flat_cost(self, comp: str) -> dict:
        """XLA's HloCostAnalysis of `comp` cut out as a module of its own. Like the analysis of a
        whole module, it counts each while loop's body and condition once."""
        if comp in self._flat_costs:
            return self._flat_costs[comp]
        keep = self.callees(comp)
        parts = ["\n".join(self.comps[c]) for c in self.comps if c in keep]
        text = "HloModule cut\n\n" + "\n\n".join(parts + ["ENTRY " + "\n".join(self.comps[comp])]) + "\n"
        module = _hlo.hlo_module_from_text(text)
        cost = _jax.hlo_module_cost_analysis(jax.devices("cpu")[0].client, module)
        # HloCostAnalysis leaves a custom call's operands out of "bytes accessed": add what each
        # Pallas call reads (a decode step's KV cache is the decode kernel's operand).
        extra = sum(self.operand_bytes(c, i) for c in [comp, *keep] for i in self.instrs[c]
                    if i.opcode == "custom-call")
        # And it counts a gather's whole operand, and a scatter's whole operand and output, where the
        # hardware reads the gathered rows and, the scatter updating its operand in place (a donated
        # pool), writes the scattered ones: a verify's 5-token embedding lookup would read the whole
        # table, and its 5 new keys write the whole pool, per layer.
        extra -= sum(self.sparse_overcount(c, i) for c in [comp, *keep] for i in self.instrs[c]
                     if i.opcode == "fusion")
        self._flat_costs[comp] = {"flops": cost.get("flops", 0.0), "bytes": cost.get("bytes accessed", 0.0) + extra}
        return self._flat_costs[comp]

    def sparse_overcount(self, comp: str, fusion: Instr) -> int:
        """Bytes HloCostAnalysis counts for a fusion rooted in a gather or an in-place scatter
        beyond what it touches: a gather's operand (less the rows it reads), a scatter's operand
        and output (less the updates it writes). 0 for other fusions."""
        [fused] = fusion.called("calls")
        root = next(i for i in self.instrs[fused] if i.line.lstrip().startswith("ROOT"))
        if root.opcode not in ("gather", "scatter"):
            return 0
        names = {i.name: i for i in self.instrs[fused]}
        args = re.findall(r"%([\w.\-]+)", root.line[root.line.index(root.opcode + "(") + len(root.opcode):])
        source = names.get(args[0])
        if source is None or source.opcode != "parameter":  # not a fusion operand read directly
            return 0
        operand = shape_bytes(source.shape)
        if root.opcode == "gather":
            return operand - shape_bytes(root.shape)
        # In place unless XLA copies the operand first (a buffer not donated): then the copy is
        # counted apart, and the scatter writes a fresh buffer.
        fusion_args = fusion.line[fusion.line.index("fusion(") + len("fusion("):]
        producer = re.findall(r"%([\w.\-]+)", fusion_args[: fusion_args.index(")")])[
            int(re.search(r"parameter\((\d+)\)", source.line)[1])]
        if shape_bytes(root.shape) != operand or self.by_name[producer].opcode == "copy":
            return 0
        return 2 * operand - shape_bytes(names[args[2]].shape)

    def operand_bytes(self, comp: str, instr: Instr) -> int:
        """Bytes of the operands of `instr`, an instruction of computation `comp`."""
        names = {i.name: i for i in self.instrs[comp]}
        args = instr.line[instr.line.index(instr.opcode + "(") + len(instr.opcode) + 1:]
        args = args[: args.index(")")]
        return sum(shape_bytes(names[n].shape) for n in re.findall(r"%([\w.\-]+)", args) if n in names)

    def cost(self, comp: str) -> dict:
        """flat_cost with each while loop counted its known trip count (1 when unknown)."""
        total = dict(self.flat_cost(comp))
        for w in (i for i in self.instrs[comp] if i.opcode == "while"):
            n = w.trip_count or 1
            for part in w.called("body") + w.called("condition"):
                flat, full = self.flat_cost(part), self.cost(part)
                for k in total:
                    total[k] += n * full[k] - flat[k]
        return total

    def walk(self, comp: str, mult: int = 1):
        """(instruction, executions per run of comp) for comp and the loops it runs (not fusions)."""
        for i in self.instrs[comp]:
            yield i, mult
            if i.opcode == "while":
                n = i.trip_count or 1
                for part in i.called("body"):
                    yield from self.walk(part, mult * n)

    def fused_opcodes(self, i: Instr) -> set[str]:
        return {j.opcode for c in i.called("calls") for j in self.instrs.get(c, [])} - _VIEWS


# --- Kernels --------------------------------------------------------------------------------------


@dataclasses.dataclass
class KernelCase:
    label: str  # e.g. "bwd E128 G4 causal T8192 B2"
    fn: object
    args: list  # ShapeDtypeStructs without sharding
    mosaic: bool = False  # Mosaic GPU kernels (read from their own dumps)


def _sds(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def _grad(f, n):
    """The gradient of sum(f(...)) in f32 with respect to its first n arguments."""
    def loss(*a):
        out = f(*a)
        return sum(jnp.sum(o.astype(jnp.float32)) for o in (out if isinstance(out, tuple) else (out,)))
    return jax.grad(loss, argnums=tuple(range(n)))


def flash_case(e, g, causal, t, b=2, grad=False, block_sizes=None) -> KernelCase:
    """Flash attention with 32 query heads, 32 // g KV heads, head dim e, sequence t, bf16."""
    f = lambda q, k, v: pk.flash_attention(q, k, v, causal=causal, block_sizes=block_sizes)  # noqa: E731
    label = f"{'bwd' if grad else 'fwd'} E{e} G{g} {'causal' if causal else 'full'} T{t} B{b}"
    q, kv = _sds(b, t, 32, e), _sds(b, t, 32 // g, e)  # (B, T, H, E), (B, S, K, E)
    return KernelCase(label, _grad(f, 3) if grad else f, [q, kv, kv])


def mosaic_case(e, causal, t, b=2, grad=False) -> KernelCase:
    """The Mosaic GPU flash attention (its default BlockSizes entry for head dim e), 32 query heads,
    8 KV heads, sequence t, bf16."""
    f = lambda q, k, v: flash_attention_mosaic(q, k, v, causal=causal)  # noqa: E731
    label = f"mosaic {'bwd' if grad else 'fwd'} E{e} G4 {'causal' if causal else 'full'} T{t} B{b}"
    q, kv = _sds(b, t, 32, e), _sds(b, t, 8, e)  # (B, T, H, E), (B, S, K, E)
    return KernelCase(label, _grad(f, 3) if grad else f, [q, kv, kv], mosaic=True)


def decode_case(e, g, s, b) -> KernelCase:
    f = lambda q, k, v, n: pk.decode_attention(q, k, v, lengths=n)  # noqa: E731
    return KernelCase(f"decode E{e} G{g} S{s} B{b}", f,
                      [_sds(b, 32, e), _sds(b, s, 32 // g, e), _sds(b, s, 32 // g, e), _sds(b, dtype=jnp.int32)])


def paged_case(e, g, s, b, page_size=16) -> KernelCase:
    """Paged decode attention, 32 query heads: b sequences of s keys each in a pool of exactly
    b * s / page_size pages (each sequence's table a run of its own pages)."""
    f = lambda q, k, v, t, n: pk.paged_decode_attention(q, k, v, t, n)  # noqa: E731
    pages, kv = b * s // page_size, 32 // g
    return KernelCase(f"paged E{e} G{g} S{s} B{b} page{page_size}", f,
                      [_sds(b, 32, e), _sds(pages, page_size, kv, e), _sds(pages, page_size, kv, e),
                       _sds(b, s // page_size, dtype=jnp.int32), _sds(b, dtype=jnp.int32)])


def rms_case(n, d, residual) -> KernelCase:
    if residual:
        f, args = (lambda x, w, r: pk.rms_norm(x, w, r)), [_sds(n, d), _sds(d), _sds(n, d)]
    else:
        f, args = (lambda x, w: pk.rms_norm(x, w)), [_sds(n, d), _sds(d)]
    return KernelCase(f"rms [{n}, {d}]{' +residual' if residual else ''} fwd+bwd", _grad(f, len(args)), args)


def quant_case(fmt, m, n, k, group_size=None, mins=False) -> KernelCase:
    """The quantized matmul: x [m, k] bf16 times a weight [n, k] quantized along k, as
    llama_jax.quant.quantize(w, fmt, group_size=..., asymmetric=mins, axis=-1) stores it."""
    values = _sds(n, k // 2, dtype=jnp.uint8) if fmt == "int4" else _sds(n, k, dtype=QUANT_VALUES[fmt])
    scales = _sds(n, 1, dtype=jnp.float32) if group_size is None else _sds(n, k // group_size, dtype=jnp.float16)
    f = lambda x, v, s, *mn: pk.quant_matmul(x, v, s, *mn, fmt=fmt, group_size=group_size)  # noqa: E731
    kind = fmt + (f" g{group_size}" if group_size else " per channel") + (" mins" if mins else "")
    return KernelCase(f"quant {kind} M{m} N{n} K{k}", f, [_sds(m, k), values, scales] + [scales] * mins)


def mosaic_quant_case(fmt, m, n, k, group_size=None, mins=False) -> KernelCase:
    """The Mosaic GPU (Hopper) quantized prefill product, operands as quant_case's."""
    base = quant_case(fmt, m, n, k, group_size, mins)
    f = lambda x, v, s, *mn: quant_matmul_mosaic(x, v, s, *mn, fmt=fmt, group_size=group_size)  # noqa: E731
    return KernelCase("mosaic " + base.label, f, base.args, mosaic=True)


QUANT_VALUES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}
# Llama 3.1 8B's products (N, K): wq/wo, w1/w3, w2, the output head.
QUANT_SHAPES_8B = ((4096, 4096), (14336, 4096), (4096, 14336), (128256, 4096))


def kernel_cases(quick=False) -> list[KernelCase]:
    """Every kernel at head dims 64 and 128, GQA groups 1/4/8, causal and not, its shortest and longest
    lengths (flash 1K-128K, its backward 1K-32K, decode 1K-128K at batch 1 and 8, paged decode (pages
    of 16) 8K-128K at batch 8); RMSNorm at [8192, 4096] and [8192, 576] (SmolLM2's width), with and
    without residual; the quantized matmul at Llama 3.1 8B's shapes. Each value appears, not each
    combination: a kernel's code differs by head dim, causal and its tile class (BlockSizes.get_default),
    while the group and the length change only index maps and grids."""
    if quick:
        return [flash_case(128, 4, True, 1024), flash_case(128, 8, True, 1024, grad=True),
                decode_case(128, 4, 8192, 8), rms_case(8192, 4096, True),
                mosaic_case(128, True, 1024, grad=True), quant_case("int4", 1, 4096, 14336, 32)]
    # Flash attention: each tile class (head dim; causal up to 2K keys, causal beyond, full) and group.
    cases = [flash_case(e, g, c, 8192) for e in (64, 128) for g, c in ((1, True), (8, False))]
    cases += [flash_case(e, 4, True, t, b=2 if t <= 8192 else 1) for e in (64, 128) for t in (1024, 131072)]
    cases += [flash_case(e, g, c, 1024, grad=True) for e in (64, 128) for g, c in ((1, True), (8, False))]
    cases += [flash_case(e, 4, True, 32768, b=1, grad=True) for e in (64, 128)]
    cases += [decode_case(128, 4, s, b) for s in (1024, 131072) for b in (1, 8)]
    cases += [decode_case(64, 4, s, b) for s, b in ((8192, 1), (131072, 8))]
    cases += [decode_case(128, g, 8192, 8) for g in (1, 8)]
    cases += [paged_case(e, 4, s, 8) for e in (64, 128) for s in (8192, 131072)]
    cases += [rms_case(8192, d, r) for d in (4096, 576) for r in (False, True)]
    # Quantized products at 8B's shapes: decode (one row, and 16) in int8 per channel and int4
    # groups of 32; the other formats (GGUF Q8_0, Q4_1, fp8) at the FFN down product; prefill
    # (a 2048-token chunk).
    cases += [quant_case(fmt, 1, n, k, g) for fmt, g in (("int8", None), ("int4", 32)) for n, k in QUANT_SHAPES_8B]
    cases += [quant_case("int8", 1, 4096, 14336, 32), quant_case("int4", 1, 4096, 14336, 32, mins=True),
              quant_case("fp8", 1, 4096, 14336), quant_case("int4", 16, 4096, 14336, 32)]
    cases += [quant_case(fmt, 2048, 14336, 4096, g) for fmt, g in (("int8", None), ("int4", 32), ("fp8", None))]
    # Mosaic GPU (Hopper): every BlockSizes entry (head dim 64, 128), causal and not, 2K-8K; the
    # backward (the longest compiles here) at 1K and 8K. tests/test_gpu_compile.py compiles the
    # backward at head dim 64, causal, 1K.
    cases += [mosaic_case(e, c, t) for e, c, t in ((64, True, 2048), (64, False, 8192), (128, True, 8192),
                                                    (128, False, 2048))]
    cases += [mosaic_case(64, False, 1024, grad=True), mosaic_case(128, True, 8192, grad=True)]
    # The Mosaic GPU quantized prefill product at 8B's w1/w3 shape (a 2048-token chunk).
    cases += [mosaic_quant_case(fmt, 2048, 14336, 4096, g) for fmt, g in (("int8", None), ("int4", 32))]
    return cases


def check_kernel(case: KernelCase, device, dump_root) -> tuple[list[dict], list[Failure]]:
    """Compiles one case; a row per launch of our kernels, and the failures (compile error, spill)."""
    dump = Path(dump_root) / re.sub(r"\W+", "_", case.label)
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(device)) for a in case.args]
    try:
        with mosaic_dumps(dump / "mosaic") if case.mosaic else contextlib.nullcontext():
            _, secs = compile_for(case.fn, args, dump)
    except Exception as e:  # noqa: BLE001 -- any compile error is a finding
        return [], [Failure(f"compile: {case.label}", _error_line(e))]
    stats = ptxas_stats(dump)
    thunks, _ = read_thunks(dump)
    rows, fails = check_mosaic(case.label, dump / "mosaic", secs)
    for t in _flatten(thunks):
        if not t.name.startswith(OUR_KERNELS):
            continue
        s = stats.get(t.name, {})
        rows.append(dict(kernel=t.name, case=case.label, grid=t.grid, warps=int(np.prod(t.threads)) // 32,
                         smem=t.smem, seconds=secs, **s))
        if s.get("spill_stores") or s.get("spill_loads"):
            fails.append(Failure(f"spill: {_base(t.name)} in {case.label}", _spills(s)))
    return rows, fails


@contextlib.contextmanager
def mosaic_dumps(dump_dir):
    """Mosaic GPU compiles its kernels itself (XLA's dump has no PTX of them): these variables make it
    write each kernel's PTX, ptxas report and MLIR passes into dump_dir while set."""
    env = dict(MOSAIC_GPU_DUMP_TO=str(dump_dir), MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1")
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    with MOSAIC_COMPILES:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def mosaic_stats(dump_dir) -> dict:
    """{kernel: {registers, spills, stack, smem, warps, wgmma, tma}} of each Mosaic GPU kernel dumped
    in dump_dir: ptxas' report, the PTX (wgmma.mma_async and TMA's cp.async.bulk.tensor present?
    threads from .maxntid) and the launch's dynamic shared memory from the lowered MLIR."""
    stats = {}
    for ptx in sorted(glob.glob(os.path.join(dump_dir, "*.ptx"))):
        base = ptx[:-len(".ptx")]
        name = os.path.basename(base)
        if not name.startswith(MOSAIC_KERNELS):
            continue
        text = Path(ptx).read_text()
        report = Path(base + ".ptxas").read_text() if os.path.exists(base + ".ptxas") else ""
        passes = Path(base + ".mlir-passes.log").read_text() if os.path.exists(base + ".mlir-passes.log") else ""
        spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", report)
        regs = re.findall(r"Used (\d+) registers", report)
        smem = [int(x) for x in re.findall(r"dynamic_shared_memory_size %c(\d+)_i32", passes)]
        threads = re.findall(r"\.maxntid (\d+), (\d+), (\d+)", text)
        row = dict(wgmma="wgmma.mma_async" in text, tma="cp.async.bulk.tensor" in text,
                   smem=max(smem) if smem else -1,
                   warps=int(np.prod([int(x) for x in threads[0]])) // 32 if threads else 0)
        if spills and regs:
            (stack, st, ld), = spills[:1]
            row.update(registers=int(regs[0]), spill_stores=int(st), spill_loads=int(ld), stack=int(stack))
        stats[name] = row
    return stats


def check_mosaic(label: str, dump_dir, secs) -> tuple[list[dict], list[Failure]]:
    """Rows and failures of the Mosaic GPU kernels a case compiled: each must use wgmma and TMA, spill
    nothing, and fit the H100's shared memory."""
    rows, fails = [], []
    for name, s in mosaic_stats(dump_dir).items():
        rows.append(dict(kernel=name, case=label, grid=(), seconds=secs, **s))
        base = _base(name)
        if "registers" not in s:
            fails.append(Failure(f"ptxas: {base} in {label}", "no ptxas report (MOSAIC_GPU_DUMP_PTXAS)"))
        elif s["spill_stores"] or s["spill_loads"]:
            fails.append(Failure(f"spill: {base} in {label}", _spills(s)))
        for key, what in (("wgmma", "wgmma.mma_async"), ("tma", "cp.async.bulk.tensor")):
            if not s[key]:
                fails.append(Failure(f"ptx: {base} in {label}", f"no {what} in its PTX"))
        if not 0 < s["smem"] <= H100_SMEM:
            fails.append(Failure(f"smem: {base} in {label}", f"{s['smem']} B of shared memory (limit {H100_SMEM})"))
    return rows, fails


def _spills(s: dict) -> str:
    return f"{s['registers']} registers, {s['spill_stores']} B spill stores, {s['spill_loads']} B spill loads"


def _flatten(thunks):
    for t in thunks:
        yield t
        yield from _flatten(t.children + t.cond + t.body)


def _base(name: str) -> str:
    return re.sub(r"_+\d+$", "", name)


# --- Whole programs -------------------------------------------------------------------------------


def programs(config, where, *, batch=1, context=4096, prompt=2048, layout="layers", attention="pallas",
             block_size=engine.DEFAULT_BLOCK_SIZE, quantize=None):
    """The engine's jitted prefill, decode and verify (llama_jax.runner, what `Llama.generate`, `stream`,
    `chat` and the server run) of `config` in bf16 with our kernels, from abstract parameters, over
    a paged KV cache. where: a Device (one GPU) or a ('data', 'model') Mesh with no data split (the
    engine's pool is split by KV heads only). layout: "layers" (per-layer arrays,
    `llama_jax.api.inference_layout(mesh)`, what `Llama` runs by default) or "scan" (the stored stacked
    layers under lax.scan). attention: the RuntimeConfig's attention_impl, "pallas" (the Triton
    kernels) or "mosaic" (the Mosaic GPU prefill kernel; decode is the Triton paged kernel in both).
    quantize: None (bf16 weights) or "int8" / "int4" / "fp8": the parameters `load(quantize=...)`
    makes (llama_jax.quant.quantize_params on the stored tree, then the layout's view), each QArray
    part placed by its weight's axes.

    The pool: blocks of `block_size` tokens (the engine's default), `batch` rows of `context`
    tokens each in blocks of their own, plus the null block 0. Prefill: `batch` rows of a chunk of
    `prompt` tokens (of a prompt that fills the context: its table as wide as the context's blocks,
    bucketed as the engine does). Decode: the engine's decode call of generate.CHUNK steps (as
    `Llama.generate` runs it), its table of the engine's decode width for a `context`-token
    max_seq_len. Speculative decoding (issue 26), as Engine._verify and _propose_draft call them:
    verify, the check of each row's last token and SPEC_K proposals at the end of its `context`
    tokens (the decode's table); draft, the decode call of SPEC_K + 1 steps a draft model makes (its own
    pool of the same blocks). Returns [(name, jitted_fn, abstract_args, meta)]; meta["min_bytes"] = (weight
    bytes, KV bytes) one decode step must read per device, with every row's `context` tokens in
    the cache (the pool's used blocks, not the null block).

    The one place that knows the engine's program API (llama_jax.runner.prefill and decode, as
    llama_jax.engine calls them): change it with that API."""
    mesh = where if isinstance(where, Mesh) else None
    if mesh is not None and (sharding.axis_size("batch", mesh) > 1 or sharding.axis_size("seq", mesh) > 1):
        raise ValueError("the engine needs a mesh without data or context axes; Llama.generate runs "
                         "llama_jax.generate's contiguous programs there, which this harness does not compile")
    runtime = llama_jax.RuntimeConfig(param_dtype="bfloat16", dtype="bfloat16", attention_impl=attention,
                                      norm_impl="pallas")
    cfg = config
    if mesh is not None:  # as load(): KV heads repeated so that each device holds whole heads
        r = sharding.kv_replication(cfg, sharding.axis_size("kv_heads", mesh))
        cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_kv_heads * r)
    place = (lambda axes, shape: SingleDeviceSharding(where)) if mesh is None else sharding.placement(mesh)

    def sds(shape, dtype, axes=None):  # an abstract array on the target, from logical axes
        return jax.ShapeDtypeStruct(shape, dtype, sharding=place(axes or (None,) * len(shape), shape))

    view = inference_layout(mesh) if layout == "layers" else model_lib.STORED
    graphdef, state = nnx.split(model_lib.abstract(cfg, runtime, view))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
    weights = nnx.to_pure_dict(state)
    if quantize:  # as load() does it: quantize the stored parameters, then view them
        stored = nnx.to_pure_dict(nnx.state(model_lib.abstract(cfg, runtime, model_lib.STORED)))
        weights = jax.eval_shape(lambda p: model_lib.view(
            quant.quantize_params(p, quantize, model_lib.LINEAR_WEIGHTS), view, cfg), stored)
    # A QArray's values, scales and mins each follow its weight's logical axes (as sharding.place).
    params = jax.tree.map(lambda spec, w: jax.tree.map(lambda a: sds(a.shape, a.dtype, tuple(spec)), w),
                          specs, weights, is_leaf=lambda x: isinstance(x, P))
    nnx.replace_by_pure_dict(state, params)

    # The pool, as ModelRunner makes it (model.page_zeros on sharding.placement(mesh)).
    b, L, K, E, bs = batch, cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, block_size
    used = b * -(-context // bs)  # each row's context in blocks of its own
    num_blocks = used + 1  # and the null block 0
    if layout == "scan":
        kv = sds((L, num_blocks, bs, K, E), jnp.bfloat16, ("layers", *PAGE_AXES))
        pool = KVCache(kv, kv)
    else:
        kv = sds((num_blocks, bs, K, E), jnp.bfloat16, PAGE_AXES)
        pool = [KVCache(kv, kv) for _ in range(L)]
    # The engine hands every other argument over as host numpy arrays: jit replicates them.
    host = lambda *shape, dtype=jnp.int32: sds(shape, dtype)  # noqa: E731
    sampling = runner.Sampling(host(b, dtype=jnp.uint32), host(b, dtype=jnp.float32), host(b, dtype=jnp.float32),
                               host(b))
    # A table's width: Engine.max_width for a max_seq_len of `context` (decode), and Engine._prefill's
    # for a prompt of `context` tokens (its blocks are allocated at admission): the same bucket.
    width = scheduler.bucket(-(-context // bs), minimum=engine.MIN_TABLE_WIDTH)

    per_device = lambda x: int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize  # noqa: E731
    weights = sum(per_device(x) for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:  # the input embedding is a lookup: a step reads b of its rows (and their scales)
        weights -= sum(per_device(a) - b * a.size // a.shape[0] * a.dtype.itemsize
                       for a in jax.tree.leaves(params["tok_embeddings"]))
    kv_bytes = sum(per_device(x) // num_blocks * used for x in jax.tree.leaves(pool))  # the used blocks only
    meta = dict(config=cfg, batch=b, context=context, layout=layout, mesh=mesh, params=params,
                block_size=bs, num_blocks=num_blocks, min_bytes=(weights, kv_bytes),
                storage=quant.describe(params) if quantize else None,
                in_place=True)  # the runner donates the pool: each program must update it in place
    # tokens [R, C] at positions start [R].., table [R, W], the chunk index of each row's last token
    # [R], its tokens generated so far [R], sampling.
    prefill_args = (graphdef, state, pool, host(b, prompt), host(b), host(b, width), host(b), host(b),
                    sampling)
    rows = runner.Rows(token=host(b), pos=host(b), count=host(b), max_new=host(b),
                       stop_ids=host(b, runner.MAX_STOP_IDS), live=host(b, dtype=jnp.bool_), sampling=sampling)
    decode_args = (graphdef, state, pool, generate.CHUNK, rows, host(b, width))
    # tokens [R, K + 1] at positions start [R].., table [R, W], each row's tokens generated so far [R].
    verify_args = (graphdef, state, pool, host(b, SPEC_K + 1), host(b), host(b, width), host(b), sampling)
    draft_args = (graphdef, state, pool, SPEC_K + 1, rows, host(b, width))
    return [("prefill", runner.prefill, prefill_args, dict(meta, kind="prefill", prompt=prompt)),
            ("decode", runner.decode, decode_args, dict(meta, kind="decode", steps=generate.CHUNK)),
            ("verify", runner.verify, verify_args, dict(meta, kind="verify")),
            ("draft", runner.decode, draft_args, dict(meta, kind="decode", steps=SPEC_K + 1))]


def not_in_place(compiled, hlo: Hlo, name: str) -> list[Failure]:
    """A failure unless the program donates arguments (the engine's pool) and XLA aliases every
    donated parameter to an output, so that the program updates it in place rather than writing a new
    copy of it each call (jit drops a donation it cannot use, with only a warning)."""
    aliased = {int(i) for i in re.findall(r"\{[\d,]*\}: \((\d+), \{[\d,]*\}, (?:may|must)-alias\)",
                                          hlo.text.split("\n", 1)[0])}
    kept = sorted(compiled._executable._kept_var_idx)  # the HLO parameters: these of the flat arguments
    donated = [i for i, a in enumerate(jax.tree.leaves(compiled.args_info)) if a.donated and i in kept]
    if not donated:
        return [Failure(f"donation: {name}", "no donated argument: the pool is copied each call")]
    missing = [i for i in donated if kept.index(i) not in aliased]
    if missing:
        return [Failure(f"donation: {name}", f"{len(missing)} of {len(donated)} donated parameters not aliased "
                        "to an output (a copy each call)")]
    return []


def analyse_program(name, fn, args, meta, dump) -> tuple[dict, list[Failure]]:
    """Compiles one program and reads its figures; for a decode loop, those of one step (the body
    of the entry computation's while loop), with the loops inside it counted their trip counts.
    Returns (row for the report, failures)."""
    try:
        t0 = time.perf_counter()
        with (jax.set_mesh(meta["mesh"]) if meta["mesh"] is not None else contextlib.nullcontext()):
            compiled = fn.trace(*args).lower().compile(
                compiler_options={"xla_dump_to": str(dump), "xla_dump_hlo_as_text": True})
        secs = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        return dict(name=name, error=_error_line(e)), [Failure(f"compile: {name}", _error_line(e))]
    hlo = Hlo(compiled)
    thunks, thunk_names = read_thunks(dump)
    trip = lambda t: hlo.by_name.get(thunk_names.get(t.id, ""), Instr("", "", "", "")).trip_count or 1  # noqa: E731
    fails = [Failure(f"spill: {_base(k)} in {name}", _spills(s))
             for k, s in ptxas_stats(dump).items() if s["spill_stores"] or s["spill_loads"]]
    if meta.get("in_place"):
        fails += not_in_place(compiled, hlo, name)
    row = dict(name=name, seconds=secs, kind=meta["kind"], layers=meta["config"].n_layers,
               **{k: meta.get(k) for k in ("batch", "context", "prompt", "block_size", "storage")})
    if meta["kind"] != "decode":
        cost, count = hlo.cost(hlo.entry), launches(thunks, trip)
        row.update(cost=cost, launches=count)
        return row, fails

    loop = next(i for i in hlo.instrs[hlo.entry] if i.opcode == "while")
    body, cond = loop.called("body")[0], loop.called("condition")[0]
    body_cost, cond_cost = hlo.cost(body), hlo.cost(cond)
    cost = {k: body_cost[k] + cond_cost[k] for k in ("flops", "bytes")}
    loop_thunk = next(t for t in thunks if t.kind == "kWhile" and thunk_names.get(t.id) == loop.name)
    count = launches(loop_thunk.body, trip) + launches(loop_thunk.cond, trip)
    w_bytes, kv_bytes = meta["min_bytes"]
    minimum = w_bytes + kv_bytes
    row.update(cost=cost, launches=count, minimum=minimum, weights=w_bytes, ratio=cost["bytes"] / minimum)
    if row["ratio"] > BYTES_SLACK:
        fails.append(Failure(f"bytes: {name}", f"{_gb(cost['bytes'])} per step, minimum {_gb(minimum)} (weights "
                             f"{_gb(w_bytes)} + KV {_gb(kv_bytes)}): {row['ratio']:.2f}x > {BYTES_SLACK}x"))

    # Thresholds: a whole weight matrix (full size, for collectives; per device, for copies) or one
    # layer's K (or V) cache per device.
    stacked = meta["layout"] == "scan"  # then the parameters under "layers" lead with the layer axis
    mats = [(x.shape[1:], x.sharding.shard_shape(x.shape)[1:], x.dtype) if stacked and path.startswith("layers")
            else (x.shape, x.sharding.shard_shape(x.shape), x.dtype) for path, x in _named_leaves(meta["params"])]
    full_min = min(int(np.prod(full)) * dt.itemsize for full, _, dt in mats if len(full) >= 2)
    shard_min = min(int(np.prod(shard)) * dt.itemsize for full, shard, dt in mats if len(full) >= 2)
    layer_kv = kv_bytes // (2 * meta["config"].n_layers)
    # {(what, op, shape, bytes): executions per step} of collectives, copies and other large writes.
    found = row["found"] = collections.Counter()
    for i, n in hlo.walk(body):
        op = i.opcode.removesuffix("-start")
        if op in _COLLECTIVES:
            out = re.findall(r"[a-z]+\d*\[[\d,]*\]", i.shape)[-1]  # an all-gather-start's shape ends with its output
            found[("collective", op, out, shape_bytes(out))] += n
            continue
        size = shape_bytes(i.shape)
        if i.opcode in _VIEWS | {"while", "custom-call"} or i.opcode.endswith("-done"):
            continue
        if size < min(shard_min, layer_kv):
            continue
        fused = hlo.fused_opcodes(i) if i.opcode == "fusion" else {i.opcode}
        if fused & {"dynamic-update-slice", "scatter"}:
            continue  # written in place: only the update moves
        label = i.opcode if i.opcode != "fusion" else "fusion{" + ",".join(sorted(fused)) + "}"
        found[("copy" if fused <= _MOVES else "large write", label, re.sub(r"\{[\d,]*\}", "", i.shape), size)] += n

    for (what, op, shape, size), n in found.items():
        if what == "collective" and size >= full_min:
            dims = tuple(d for d in _dims(shape) if d > 1)
            match = [p for p, x in _named_leaves(meta["params"]) if tuple(x.shape[-len(dims):]) == dims]
            whole = f" (the whole {match[0]})" if match else ""
            fails.append(Failure(f"collective: {name}: {op} {shape}", f"{size / 1e6:.1f} MB, {n} per step{whole}"))
        elif what == "copy":
            fails.append(Failure(f"copy: {name}: {op} {shape}", f"{size / 1e6:.1f} MB, {n} per step"))
    return row, fails


def verify_failures(program_rows) -> list[Failure]:
    """Each verify row against one decode step of the same program (model, GPUs, layout, weights):
    sets the row's step_bytes and vs_step (verify bytes / step bytes); a failure where vs_step
    exceeds VERIFY_SLACK, or where no such decode step compiled."""
    key = lambda r: (r["program"][:3], r["quantize"])  # noqa: E731
    steps = {key(r): r for r in program_rows if "program" in r and r["program"][3] == "decode" and "error" not in r}
    fails = []
    for r in program_rows:
        if r.get("kind") != "verify" or "error" in r:
            continue
        step = steps.get(key(r))
        if step is None:
            fails.append(Failure(f"verify: {r['name']}", "no decode step of the same program to compare with"))
            continue
        r["step_bytes"], r["vs_step"] = step["cost"]["bytes"], r["cost"]["bytes"] / step["cost"]["bytes"]
        if r["vs_step"] > VERIFY_SLACK:
            fails.append(Failure(f"verify: {r['name']}", f"{_gb(r['cost']['bytes'])} per verify of {SPEC_K} "
                                 f"proposals, one decode step {_gb(r['step_bytes'])}: {r['vs_step']:.2f}x > "
                                 f"{VERIFY_SLACK}x"))
    return fails


def _named_leaves(tree):
    """[(path like 'layers/0/attention/wq', leaf)]; a quantized weight's leaf is its values (its
    scales are not a matrix of their own)."""
    is_q = lambda x: isinstance(x, quant.QArray)  # noqa: E731
    return [("/".join(str(getattr(k, "key", k)) for k in path), x.values if is_q(x) else x)
            for path, x in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_q)]


def program_specs(quick=False):
    """(label, config, n_gpus, layout, which, attention, quantize) for each program compiled; 'which'
    picks prefill/decode/verify/draft, 'attention' the attention_impl, 'quantize' the weights' format
    (None: bf16). Speculative decoding: the 8B's verify, with the 1B as its draft.
    The decode checks apply to the "layers" layout (what `Llama` runs); the opt-in scanned layout
    (`unstack_layers=False`) is compiled and reported, checked only for compile errors and spills."""
    one, eight = llama_jax.LLAMA3_2_1B, llama_jax.LLAMA3_1_8B
    specs = [("Llama 3.2 1B", one, 1, "layers", ("prefill", "decode", "draft"), "pallas", None),
             ("Llama 3.2 1B int4", one, 1, "layers", ("decode",), "pallas", "int4")]
    if quick:
        return specs
    return specs + [("Llama 3.2 1B int8", one, 1, "layers", ("decode",), "pallas", "int8"),
                    ("Llama 3.2 1B", one, 1, "scan", ("decode",), "pallas", None),
                    ("Llama 3.1 8B", eight, 1, "layers", ("prefill", "decode", "verify"), "pallas", None),
                    ("Llama 3.1 8B int8", eight, 1, "layers", ("decode",), "pallas", "int8"),
                    ("Llama 3.1 8B int4", eight, 1, "layers", ("decode",), "pallas", "int4"),
                    ("Llama 3.1 8B", eight, 1, "scan", ("decode",), "pallas", None),
                    ("Llama 3.1 8B tp=8", eight, 8, "layers", ("prefill", "decode"), "pallas", None),
                    ("Llama 3.1 8B tp=8", eight, 8, "scan", ("decode",), "pallas", None),
                    ("Llama 3.1 8B mosaic", eight, 1, "layers", ("prefill",), "mosaic", None),
                    ("Llama 3.1 8B int4 mosaic", eight, 1, "layers", ("prefill",), "mosaic", "int4")]


def train_specs(quick=False):
    """(label, config, make_mesh sizes, TrainConfig, RuntimeConfig) of each training step compiled for
    8 H100s: the gradient program (forward, loss and backward; the optimizer update is elementwise),
    bf16 compute with f32 master weights, our kernels (Triton, or the Mosaic GPU attention), layers
    scanned and recomputed in the backward."""
    one = llama_jax.LLAMA3_2_1B
    tc = train.TrainConfig(seq_len=4096, batch_size=8, compute_dtype="bfloat16", remat=True, scan_layers=True)
    pallas = llama_jax.RuntimeConfig(attention_impl="pallas", norm_impl="pallas")
    specs = [("Llama 3.2 1B train fsdp4 x tp2", one, dict(fsdp=4, tp=2), tc, pallas)]
    if quick:
        return specs
    mosaic = dataclasses.replace(pallas, attention_impl="mosaic")
    return specs + [("Llama 3.2 1B train cp4 x tp2", one, dict(cp=4, tp=2), dataclasses.replace(tc, batch_size=2),
                     pallas),
                    ("Llama 3.2 1B train mosaic fsdp4 x tp2", one, dict(fsdp=4, tp=2), tc, mosaic)]


def train_mesh(topo, sizes: dict) -> Mesh:
    """The make_mesh(**sizes) mesh over the topology's (compile-target) devices."""
    shape = [sizes.get(k, 1) for k in ("pp", "dp", "fsdp", "cp", "tp")]  # sharding.MESH_AXES order
    return Mesh(np.array(topo.devices).reshape(shape), sharding.MESH_AXES)


# --- The report -----------------------------------------------------------------------------------


def _gb(x):
    return f"{x / 1e9:.3f} GB"


def report(kernel_rows, program_rows, failures, expected, args, total_s) -> str:
    versions = ", ".join(f"{p} {_version(p)}" for p in ("jax", "jaxlib", "jax-cuda12-plugin", "flax"))
    shown = {k: v for k, v in vars(args).items() if v and k not in ("dump_dir", "jobs")}  # what is compiled and checked
    cmd = " ".join(["python benchmarks/gpu_compile.py"] + [f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                                                           for k, v in shown.items()])
    out = ["# Compiled for an H100, without a GPU", "",
           f"Generated by `{cmd}` (`make gpu-check`) on {datetime.date.today()}: {versions}, ptxas "
           f"{ptxas_version()}; target `benchmarks/gpu/h100_sxm.txtpb` (sm_90a). Compile and analysis took "
           f"{total_s:.0f} s here ({_cpu_seconds():.0f} CPU s, {args.jobs} compiles at once; the compile s columns "
           "grow with the host's load). Do not edit by hand.", ""]
    out += [f"## Failures ({len(failures)})", ""]
    out += [f"- {f.key}: {f.detail}" + (" *(known: listed in --expected)*" if f.key in expected else "")
            for f in failures] or ["None."]
    first = lambda key: next((r[key] for r in program_rows if r.get(key)), "?")  # noqa: E731
    out += ["", "## Programs", "",
            f"bf16 (rows named int8 / int4: quantized weights, below), Pallas kernels: the engine's programs "
            f"(`llama_jax.runner.prefill`, `decode` and `verify`, what "
            f"`Llama.generate`, `chat` and the server run) over a paged KV cache of blocks of {first('block_size')} "
            f"tokens; batch {first('batch')}, {first('context')} tokens of context in the pool, a prefill chunk of "
            f"{first('prompt')} tokens. Decode rows: one step "
            "(the decode loop's body); prefill rows: the whole chunk; verify and draft rows: speculative decoding "
            "(below). *layers*: a list of per-layer "
            "blocks (what `Llama` runs by default); *scan*: stacked layers under `lax.scan`. Train rows: the "
            "gradient program of one training step on 8 H100s (`llama_jax.train.gradient_program`: bf16 compute, "
            "f32 master weights, each layer recomputed in the backward), per device.", "",
            "| program | compile s | kernels (per layer) | memcpys | collectives | GFLOP | bytes accessed | "
            "roofline ms | minimum bytes | bytes / minimum |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in program_rows:
        if "error" in r:
            out.append(f"| {r['name']} | error | | | | | | | | |")
            continue
        c, n = r["cost"], r["launches"]
        roof = max(c["flops"] / H100_FLOPS, c["bytes"] / H100_BYTES_PER_S) * 1e3
        mins = (_gb(r["minimum"]), f"{r['ratio']:.3f}") if "minimum" in r else ("", "")
        moved = sum(k[3] * m for k, m in r.get("found", {}).items() if k[0] == "collective")
        coll = f"{n['collective']}" + (f" ({moved / 1e6:.1f} MB)" if moved else "")
        kernels = f"{n['kernel']} ({n['kernel'] / r['layers']:.1f})"
        out.append(f"| {r['name']} | {r['seconds']:.1f} | {kernels} | {n['copy']} | {coll} | {c['flops'] / 1e9:.1f} | "
                   f"{_gb(c['bytes'])} | {roof:.3f} | {mins[0]} | {mins[1]} |")
    for r in program_rows:
        if r.get("found"):
            note = "" if r["checked"] else " (reported, not checked)"
            out += ["", f"**{r['name']}**, per decode step{note}:"]
            for what in ("collective", "copy", "large write"):
                top = sorted(((k, n) for k, n in r["found"].items() if k[0] == what), key=lambda e: -e[0][3] * e[1])
                out += [f"- {what}: {op} {s}, {b / 1e6:.3f} MB, {n} per step" for (_, op, s, b), n in top[:6]]
    out += quantized_section(program_rows)
    out += speculative_section(program_rows)
    out += ["", "## Kernels", "",
            "Every launch of our Pallas kernels in each compiled case (bwd cases run the forward too). "
            "Registers, spills and stack from `ptxas -v -arch=sm_90a`; grid, warps and dynamic shared "
            "memory from XLA's thunk sequence. Mosaic GPU kernels (`mosaic_*`) compile outside XLA: "
            "their ptxas report, PTX (wgmma.mma_async, TMA's cp.async.bulk.tensor; threads) and "
            "shared memory (the launch in the lowered MLIR) come from `MOSAIC_GPU_DUMP_*`; no grid.", "",
            "| kernel | case | registers | spill st/ld B | stack B | shared KB | grid | warps | wgmma/TMA | compile s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in kernel_rows:
        hopper = "/".join("yes" if r[k] else "NO" for k in ("wgmma", "tma")) if "wgmma" in r else ""
        out.append(f"| {_base(r['kernel'])} | {r['case']} | {r.get('registers', '?')} | {r.get('spill_stores', '?')}/"
                   f"{r.get('spill_loads', '?')} | {r.get('stack', '?')} | {r['smem'] / 1024:.1f} | "
                   f"{'x'.join(map(str, r['grid']))} | {r['warps']} | {hopper} | {r['seconds']:.2f} |")
    out += ["", "## Method", "", METHOD]
    return "\n".join(out) + "\n"


def quantized_section(program_rows) -> list[str]:
    """The quantized decode steps against their minimum and against the same program in bf16."""
    rows = [r for r in program_rows if r.get("quantize") and r.get("kind") == "decode" and "error" not in r]
    if not rows:
        return []
    bf16 = {r["program"]: r for r in program_rows if "program" in r and not r["quantize"] and "error" not in r}
    out = ["", "## Quantized weights", "",
           "Decode steps with the weights `load(quantize=...)` makes (`llama_jax.quant.quantize_params`; what each "
           "weight became is listed below the table), one H100, the pool above. Minimum: the weights at their "
           "stored width with their scales and minimums (of the embedding, the rows looked up) plus the KV cache. "
           "*vs bf16*: the same program with bf16 weights. *quant_matmul*: launches of the Pallas quantized "
           "product per step (other quantized products are XLA's convert fused into its dot). The width bounds "
           "the ratio to bf16: int8 per channel is 8 bits a weight (0.5), int4 with an f16 scale and minimum per "
           "32 weights 5 bits (0.31), and int4 models keep an int8 output head (`quant.TABLE_FORMAT`).", "",
           "| program | bytes accessed | minimum bytes | bytes / minimum | weights | bytes vs bf16 | weights vs bf16 | "
           "quant_matmul |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = bf16.get(r["program"])
        vs = (f"{r['cost']['bytes'] / base['cost']['bytes']:.3f}", f"{r['weights'] / base['weights']:.3f}") if base \
            else ("", "")
        kernel = sum(n for k, n in r["launches"].items() if isinstance(k, tuple) and k[1].startswith("quant_matmul"))
        out.append(f"| {r['name']} | {_gb(r['cost']['bytes'])} | {_gb(r['minimum'])} | {r['ratio']:.3f} | "
                   f"{_gb(r['weights'])} | {vs[0]} | {vs[1]} | {kernel} |")
    out += [""] + [f"- {r['name']}: {r['storage']}" for r in rows]
    return out


def speculative_section(program_rows) -> list[str]:
    """Each verify call against one decode step of its model, and the draft model's decode steps."""
    verifies = [r for r in program_rows if "vs_step" in r]
    drafts = [r for r in program_rows if "program" in r and r["program"][3] == "draft" and "error" not in r]
    if not verifies and not drafts:
        return []
    out = ["", "## Speculative decoding", "",
           f"Issue 26, K = {SPEC_K} proposals (`SpeculativeConfig`'s default), the pool above. *verify* rows: one "
           "call of `llama_jax.runner.verify` (each row's last token and its K proposals in one forward over K + 1 "
           "positions, a token sampled after each; what `Engine._verify` runs); it must read at most "
           f"{VERIFY_SLACK}x the bytes of one decode step of the same model. *draft* rows: one step of the draft "
           "model's decode call of K + 1 steps (`Engine._propose_draft`: the last step writes the K-th proposal's "
           "keys and values; its own pool of the same blocks).", "",
           "| program | GFLOP | bytes accessed | one decode step of the target | bytes / decode step |",
           "|---|---|---|---|---|"]
    for r in verifies:
        out.append(f"| {r['name']} | {r['cost']['flops'] / 1e9:.1f} | {_gb(r['cost']['bytes'])} | "
                   f"{_gb(r['step_bytes'])} | {r['vs_step']:.3f} |")
    for r in drafts:
        out.append(f"| {r['name']}, per step | {r['cost']['flops'] / 1e9:.1f} | {_gb(r['cost']['bytes'])} | | |")
    for v in verifies:
        for d in drafts:  # a round: K + 1 draft steps, then the verify; it yields up to K + 1 tokens
            spent = (SPEC_K + 1) * d["cost"]["bytes"] + v["cost"]["bytes"]
            out += ["", f"A round of {d['name']} and {v['name']} ({SPEC_K + 1} draft steps, one verify) reads "
                    f"{_gb(spent)}: {spent / v['step_bytes']:.2f} target decode steps' bytes for up to {SPEC_K + 1} "
                    "tokens."]
    return out


METHOD = """\
- **Target.** `jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...,
  topology="1x1x1")` (or `"1x1x8"`: one host, 8 GPUs, a `(1, 8)` `('data', 'model')` mesh) with the
  project's `GpuTargetConfigProto` of an H100 SXM. Arguments are `ShapeDtypeStruct`s sharded on its
  devices; `jit(f).trace(...).lower().compile(compiler_options={"xla_dump_to": ...})` runs XLA's GPU
  pipeline; the kernels pick their compiled branch through `lax.platform_dependent`. XLA cannot
  autotune without a GPU, so its GEMM tilings are defaults.
- **Kernels.** `ptxas -v -arch=sm_90a` on each dumped PTX whose entry is one of ours; the thunk
  sequence gives each launch's grid, threads (warps = threads / 32) and dynamic shared memory.
- **Bytes and FLOPs** come from XLA's HloCostAnalysis (`_jax.hlo_module_cost_analysis`
  on the compiled, per-device module; `compiled.cost_analysis()` is unimplemented for this target).
  It counts a while loop's body once, a Pallas call (a custom call) as its output bytes only with 0
  FLOPs, a dynamic-update-slice as the update only, but a gather as its whole operand and a scatter
  as its whole operand and output; the harness adds each Pallas call's operand bytes (so the decode
  kernel's read of the KV cache counts), counts a gather as the rows it reads and an in-place
  scatter (into the donated pool: no copy before it) as the rows it writes (a verify's 5-token
  embedding lookup and its 5 new keys per layer; uncounted, the 8B verify would read 1.16x a decode
  step, not 1.02x). To get one decode step, the decode loop's body
  (and condition) is cut out of the optimized HLO as a module of its own and analysed; each loop
  inside it (the layer scan) is then counted its known trip count: cost = flat cost + (n - 1) x
  body cost. Prefill (one chunk) and verify (one call): the whole module, loops counted the same way.
- **Minimum bytes of a decode step, per device**: every parameter shard (a quantized weight's
  values, scales and mins; of an untied input embedding only the looked-up rows) plus the KV cache
  shard the context fills (K and V, every layer): the pool's used blocks, each row's context tokens, without the null block. The paged
  decode kernel reads the pool as an operand (the harness counts the whole pool, null block too). Roofline = max(FLOPs / 989 TFLOP/s,
  bytes / 3.35 TB/s).
- **Kernels per step**: launches in the decode loop's thunks (kernels, memcpys, collectives), loops
  inside counted their trip counts; per layer = step / layers.
- **Checks**: a compile error; any spill in our kernels (kernel cases and programs); a decode step
  reading more than 5% over the minimum; a verify call (speculative decoding) reading more than 10%
  over one decode step of its model; a collective in the decode step whose output is as large as
  a whole weight matrix; an instruction in the decode step that only moves data (copy, pad,
  broadcast, slice, convert, ...) writing at least a weight shard or one layer's KV cache shard.
  *Large writes* list other big per-step outputs (e.g. f32 products of a matrix-vector multiply)."""


def _cpu_seconds() -> float:
    """CPU time of this process and its children (ptxas) so far."""
    import resource
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _version(pkg):
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def read_expected(path) -> set[str]:
    """The failure keys listed in path, one a line ('#' starts a comment)."""
    return {l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")}


def _progress(line: str, fails) -> None:
    print(line + "".join(f"\n  FAIL {f.key}: {f.detail}" for f in fails), flush=True)


def program_jobs(quick, dump_root) -> list:
    """A job per program of program_specs and train_specs, built here (abstract arguments) and
    compiled when called: each returns (report row or None where it could not be built, failures)."""
    jobs = []
    for label, config, n_gpus, layout, which, attention, quantize in program_specs(quick):
        topo = h100(n_gpus)
        where = topo.devices[0] if n_gpus == 1 else Mesh(np.array(topo.devices).reshape(1, n_gpus), ("data", "model"))
        try:
            built = programs(config, where, layout=layout, attention=attention, quantize=quantize)
        except Exception as e:  # noqa: BLE001 -- e.g. the generation API changed under programs()
            jobs.append(functools.partial(_not_built, f"build: {label} ({layout})", e))
            continue
        for kind, fn, fargs, meta in built:
            if kind in which:
                extra = dict(checked=layout == "layers", quantize=quantize, program=(config, n_gpus, layout, kind))
                jobs.append(functools.partial(_program_job, f"{label} {kind} ({layout})", fn, fargs, meta, extra,
                                              attention == "mosaic", dump_root))
    for label, config, sizes, tc, runtime in train_specs(quick):
        mesh = train_mesh(h100(8), sizes)
        try:
            fn, fargs = train.gradient_program(config, tc, mesh, runtime)
        except Exception as e:  # noqa: BLE001 -- e.g. the training API changed under gradient_program
            jobs.append(functools.partial(_not_built, f"build: {label}", e))
            continue
        meta = dict(config=config, kind="train", mesh=mesh, batch=tc.batch_size, prompt=tc.seq_len)
        jobs.append(functools.partial(_program_job, label, fn, fargs, meta, dict(checked=True),
                                      runtime.attention_impl == "mosaic", dump_root))
    return jobs


def _not_built(key, error):
    return None, [Failure(key, _error_line(error))]


def _program_job(name, fn, fargs, meta, extra, mosaic, dump_root):
    with MOSAIC_COMPILES if mosaic else contextlib.nullcontext():
        row, fails = analyse_program(name, fn, fargs, meta, dump_root / re.sub(r"\W+", "_", name))
    row.update(extra)
    if not row["checked"]:  # the opt-in scanned layout: only compile errors and spills count
        fails = [f for f in fails if f.key.startswith(("compile", "spill"))]
    return row, fails


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few kernels and the 1B programs only")
    ap.add_argument("--out", help="write the markdown report here (e.g. docs/GPU_COMPILE.md)")
    ap.add_argument("--no-fail", action="store_true", help="exit 0 even with failures (still listed)")
    ap.add_argument("--expected", help="a file of known failure keys (e.g. benchmarks/gpu/expected_failures.txt): "
                    "those do not fail the run, but one that no longer happens does")
    ap.add_argument("--dump-dir", help="keep XLA's dumps here (default: a temporary directory)")
    ap.add_argument("--jobs", type=int, default=2, help="compiles at once (each keeps about one core busy)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    dump_root = Path(args.dump_dir or tempfile.mkdtemp(prefix="gpu_compile_"))
    failures, kernel_rows, program_rows = [], [], []

    # Cases and programs compile in a pool (each compile keeps about one core busy), in the order
    # listed; their rows and failures are read back in that order, so the report does not depend
    # on which finished first.
    device = h100(1).devices[0]
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        cases = kernel_cases(args.quick)
        checked = pool.map(lambda case: check_kernel(case, device, dump_root / "kernels"), cases)
        analysed = pool.map(lambda job: job(), program_jobs(args.quick, dump_root / "programs"))
        for case, (rows, fails) in zip(cases, checked):
            kernel_rows += rows
            failures += fails
            _progress(f"kernel {case.label}: {rows[0]['seconds'] if rows else 0:.2f} s", fails)
        for row, fails in analysed:
            if row is not None:
                program_rows.append(row)
            failures += fails
            _progress(f"program {row['name']}: {row.get('seconds', 0):.1f} s" if row else "program not built", fails)
    failures += verify_failures(program_rows)

    total = time.perf_counter() - t_start
    if not args.dump_dir:
        shutil.rmtree(dump_root, ignore_errors=True)
    expected = read_expected(args.expected) if args.expected else set()
    if args.out:
        Path(args.out).write_text(report(kernel_rows, program_rows, failures, expected, args, total))
    seen = {f.key for f in failures}
    unexpected = [f for f in failures if f.key not in expected]
    fixed = sorted(expected - seen) if not args.quick else []
    print(f"\n{len(kernel_rows)} kernel launches, {len(program_rows)} programs, {total:.0f} s "
          f"({_cpu_seconds():.0f} CPU s); "
          f"{len(failures)} failures ({len(failures) - len(unexpected)} expected)")
    for f in unexpected:
        print(f"FAIL {f.key}: {f.detail}")
    for k in fixed:
        print(f"FIXED (remove it from {args.expected}): {k}")
    return 0 if args.no_fail or not (unexpected or fixed) else 1


if __name__ == "__main__":
    sys.exit(main())
