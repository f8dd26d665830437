"""Everything a lent GPU should run, in one command, with the figures appended to docs/PERFORMANCE.md.

    python benchmarks/gpu_all.py                    # every step, full shapes
    python benchmarks/gpu_all.py --quick            # smaller shapes and fewer iterations
    python benchmarks/gpu_all.py --only kernel-tests roofline
    python benchmarks/gpu_all.py --dry-run          # print the commands, run nothing (works anywhere)
    python benchmarks/gpu_all.py --out $OUT/PERFORMANCE.md   # append there instead (created if absent)

Steps, in order (each its own subprocess with a timeout, so one failure or hang does not stop the
rest): the kernel tests with the real compiled kernels, the kernel benchmarks against XLA, jax's
Pallas ops and cuDNN, causal attention in TFLOP/s (our Mosaic GPU and Triton kernels, cuDNN), the
decode roofline fraction of Llama 3.2 1B and Llama 3.1 8B (bf16, random
weights; measured in a child of this script), the long-context and training benchmarks, generation,
prefill, `llama-jax bench` and serving. After each step the report section is rewritten in place:
one dated section (device kind, jax and jaxlib versions, date, and per step its exact command, exit
status, seconds and stdout, or its output's tail when it failed), so a run cut short keeps the steps
it finished. The file is written to a temporary file and renamed; nothing before the section changes.

It refuses to run (exit 2) when jax's default backend is not "gpu", unless --dry-run or --allow-cpu.
This process never imports jax itself (a child probes the device), so it holds no GPU memory.
Public jax APIs only: runs on jax 0.10 to 0.12.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
ME = str(Path(__file__).resolve())
# Published HBM bandwidth, bytes/s, by a substring of jax's device_kind (first match wins).
ROOFLINE_PRESETS = ("llama3.2-1b", "llama3.1-8b")  # keys of llama_jax.PRESETS
SPEC_BANDWIDTH = [("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12)]


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    markdown: bool = False  # stdout is already a markdown table: embed it as is


def steps(quick: bool) -> list[Step]:
    """The steps in run order; quick picks smaller shapes, fewer iterations and shorter timeouts."""
    q = quick
    t = (lambda full, short: short if q else full)
    return [
        Step("kernel-tests", [PY, "-m", "pytest", "-q", "-rfE", "tests/test_kernels.py",
                              "tests/test_model_kernels.py"], t(1200, 600)),
        Step("kernels", [PY, "benchmarks/kernels.py"] + (["--iters", "3"] if q else []), t(900, 400)),
        Step("roofline", [PY, "benchmarks/gpu_all.py", "--roofline"] + (["--quick"] if q else []), t(900, 400),
             markdown=True),
        Step("attention", [PY, "benchmarks/gpu_all.py", "--attention"] + (["--quick"] if q else []),
             t(900, 400), markdown=True),
        Step("long-context", [PY, "benchmarks/long_context.py", "--tokens", t("131072", "32768"),
                              "--config", "llama3.1-8b", "--dtype", "bfloat16"], t(1200, 500)),
        Step("train", [PY, "benchmarks/train.py", "--gpu"]
             + (["--batch", "2", "--seq", "512", "--steps", "2"] if q else ["--batch", "8", "--seq", "2048"]),
             t(1200, 500)),
        Step("generate", [PY, "benchmarks/generate.py", "--dtype", "bfloat16"] + (["--no-hf"] if q else []),
             t(900, 300)),
        Step("prefill", [PY, "benchmarks/prefill.py"] + (["--lengths", "128", "2048", "--no-hf"] if q else []),
             t(900, 300)),
        Step("bench", [PY, "-m", "llama_jax.cli", "bench", "--new-tokens", t("256", "64")], t(600, 300)),
        Step("serve", [PY, "benchmarks/serve.py", "--max-batch", "64", "--decode-steps", "8", "--rate", "50"]
             + (["--clients", "1", "16", "--requests", "2"] if q else ["--clients", "1", "4", "16", "64",
                                                                       "--requests", "4"]), t(900, 300)),
    ]


STEP_NAMES = [s.name for s in steps(False)]


def shown(argv: list[str]) -> str:
    """The command as a person would type it from the repository root."""
    return shlex.join(["python" if a == PY else a for a in argv])


# --- children: the device probe and the decode roofline -----------------------------------------

def probe() -> dict:
    """Backend, device and versions, from public APIs only (memory_stats() may be None or absent)."""
    import jax

    try:
        from importlib.metadata import version
        jaxlib = version("jaxlib")
    except Exception:  # noqa: BLE001 - a version string is nice to have, never required
        jaxlib = "?"
    dev = jax.devices()[0]
    stats = None
    try:
        stats = dev.memory_stats()
    except Exception:  # noqa: BLE001 - unimplemented on some backends
        pass
    limit = (stats or {}).get("bytes_limit")
    return {"backend": jax.default_backend(), "device_kind": dev.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib, "memory_gb": round(limit / 1e9, 1) if limit else None}


def spec_bandwidth(kind: str) -> float | None:
    return next((bw for key, bw in SPEC_BANDWIDTH if key in kind), None)


def roofline(quick: bool) -> None:
    """Decode tok/s of Llama 3.2 1B and 3.1 8B (bf16, random weights, batch 1) against the memory
    bound: bytes a step must read (every weight once, plus the KV cache at the mean context) over the
    bandwidth, both measured here (`read_bandwidth`) and published for the device. Prints a markdown
    table a row at a time, so a model that fails (out of memory) leaves the rows before it."""
    import gc

    import jax

    sys.path.insert(0, str(ROOT))
    import llama_jax
    from llama_jax.bench import decode_bytes_per_token, read_bandwidth, time_generate

    kind = jax.devices()[0].device_kind
    measured = read_bandwidth()
    spec = spec_bandwidth(kind)
    prompt_len, new_tokens = (16, 32) if quick else (128, 256)
    print(f"Decode roofline, {kind}: read bandwidth measured {measured / 1e12:.2f} TB/s (a jitted f32 "
          f"matrix-vector product over 512 MB), published "
          f"{f'{spec / 1e12:.2f} TB/s' if spec else 'unknown'}; greedy, batch 1, {new_tokens} tokens after "
          f"a {prompt_len}-token prompt, median of 3; the KV cache counted at the mean context.\n\n"
          "| model | MB read per token | decode tok/s | bound (measured BW) tok/s | fraction "
          "| bound (published BW) tok/s | fraction |\n| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for name in ROOFLINE_PRESETS:
        config = llama_jax.PRESETS[name]
        model = llama_jax.from_config(config, llama_jax.RuntimeConfig(param_dtype="bfloat16", dtype="bfloat16"))
        tok_s = time_generate(model, prompt_len=prompt_len, new_tokens=new_tokens)["decode_tok_s"]
        per_token = decode_bytes_per_token(model, prompt_len + new_tokens // 2)
        b_meas = measured / per_token
        b_spec = f"{spec / per_token:.1f} | {tok_s / (spec / per_token):.1%}" if spec else "? | ?"
        print(f"| {name} | {per_token / 1e6:.0f} | {tok_s:.1f} | {b_meas:.1f} | {tok_s / b_meas:.1%} | {b_spec} |",
              flush=True)
        del model
        gc.collect()


def attention_flops(B, H, T, E, causal=True) -> float:
    """Attention forward FLOPs: QK^T and PV, 2 * B * H * T * T * E each, halved when causal."""
    return 4 * B * H * T * T * E / (2 if causal else 1)


def attention_table(quick: bool) -> None:
    """Causal flash attention forward in TFLOP/s: our Mosaic GPU (wgmma/TMA) and Triton kernels
    against cuDNN (`jax.nn.dot_product_attention(implementation="cudnn")`). B=2, H=32, K=8, E=128,
    bf16, T=S in 2K/4K/8K; median of `iters` timed calls after two warm-ups; each cell also gives the
    max error against `flash_attention_reference` (f32), the first run of the compiled Mosaic kernel
    on real hardware. Prints a markdown table a row at a time; an implementation that fails gets
    its error in its cell."""
    import statistics

    import jax
    import jax.numpy as jnp

    sys.path.insert(0, str(ROOT))
    from pallas_kernels import flash_attention, flash_attention_mosaic, flash_attention_reference

    def timed(f, *args, iters=3 if quick else 20):
        for _ in range(2):
            jax.block_until_ready(f(*args))
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    impls = [("Mosaic (ours)", jax.jit(lambda q, k, v: flash_attention_mosaic(q, k, v, causal=True))),
             ("Triton (ours)", jax.jit(lambda q, k, v: flash_attention(q, k, v, causal=True))),
             ("cuDNN", jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
                 q, k, v, is_causal=True, implementation="cudnn")))]
    B, H, K, E = 2, 32, 8, 128
    print(f"Causal flash attention forward, {jax.devices()[0].device_kind}: B={B}, H={H}, K={K}, E={E}, "
          "bf16, TFLOP/s (4*B*H*T*T*E / 2 over the median time) and max |error| against the f32 reference.\n\n"
          "| T | " + " | ".join(n for n, _ in impls) + " |\n|" + " --- |" * (len(impls) + 1), flush=True)
    for T in (2048, 4096) if quick else (2048, 4096, 8192):
        kq, kk, kv = jax.random.split(jax.random.PRNGKey(T), 3)
        q = jax.random.normal(kq, (B, T, H, E), jnp.bfloat16)
        k = jax.random.normal(kk, (B, T, K, E), jnp.bfloat16)
        v = jax.random.normal(kv, (B, T, K, E), jnp.bfloat16)
        ref = flash_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True)
        cells = []
        for _, f in impls:
            try:
                err = float(jnp.max(jnp.abs(f(q, k, v).astype(jnp.float32) - ref)))
                cells.append(f"{attention_flops(B, H, T, E) / timed(f, q, k, v) / 1e12:.0f} (err {err:.1e})")
            except Exception as e:  # noqa: BLE001 -- one failing implementation keeps the row
                cells.append(f"error: {type(e).__name__}: {str(e).splitlines()[0][:80]}" if str(e) else type(e).__name__)
        print(f"| {T} | " + " | ".join(cells) + " |", flush=True)


# --- running the steps and writing the report -----------------------------------------------------

def run_step(step: Step, timeout_s: int) -> dict:
    """Runs one step from the repository root in its own process group (killed whole on timeout)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    t0 = time.perf_counter()
    proc = subprocess.Popen(step.argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        rc = None
    return {"rc": rc, "seconds": time.perf_counter() - t0, "stdout": out, "stderr": err}


def tail(text: str, n: int) -> str:
    lines = text.rstrip("\n").splitlines()
    return "\n".join((["..."] if len(lines) > n else []) + lines[-n:])


def step_block(step: Step, r: dict, timeout_s: int) -> str:
    """One step's part of the section: command, status, then its table, or its output's tail on failure."""
    status = (f"timed out after {timeout_s} s" if r["rc"] is None
              else "ok" if r["rc"] == 0 else f"failed, exit {r['rc']}")
    head = f"**{step.name}**: `{shown(step.argv)}`: {status}, {r['seconds']:.0f} s"
    if r["rc"] == 0 and step.markdown:
        return f"{head}\n\n{r['stdout'].strip()}\n"
    body = (tail(r["stdout"], 80) if r["rc"] == 0
            else tail(r["stdout"], 20) + "\n--- stderr ---\n" + tail(r["stderr"], 30))
    return f"{head}\n\n```text\n{body.strip()}\n```\n"


def section_header(info: dict, date: str, quick: bool) -> str:
    mem = f", {info['memory_gb']} GB usable" if info.get("memory_gb") else ""
    return (f"#### {info['device_kind']} x{info['device_count']}{mem}, {date}, jax {info['jax']}, "
            f"jaxlib {info['jaxlib']}: `python benchmarks/gpu_all.py{' --quick' if quick else ''}`\n")


def write_report(path: Path, base: str, section: str) -> None:
    """Writes base (the file as it was before this run) plus section, atomically: a temporary file in
    the same directory, then a rename, keeping the file's permissions."""
    text = (base.rstrip("\n") + "\n\n" if base.strip() else "") + section.rstrip("\n") + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="+", choices=STEP_NAMES, metavar="STEP",
                   help=f"run only these steps (of: {', '.join(STEP_NAMES)})")
    p.add_argument("--dry-run", action="store_true", help="print each step's command; run nothing")
    p.add_argument("--out", default=str(ROOT / "docs" / "PERFORMANCE.md"), help="the markdown file to append to")
    p.add_argument("--quick", action="store_true", help="smaller shapes, fewer iterations, shorter timeouts")
    p.add_argument("--allow-cpu", action="store_true", help="run even when jax's backend is not gpu")
    p.add_argument("--timeout", type=int, default=None, help="seconds per step (default: each step's own)")
    p.add_argument("--roofline", action="store_true", help=argparse.SUPPRESS)  # the roofline step's child
    p.add_argument("--attention", action="store_true", help=argparse.SUPPRESS)  # the attention step's child
    p.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the device probe's child
    args = p.parse_args(argv)

    if args.probe:
        print(json.dumps(probe()))
        return 0
    if args.roofline:
        roofline(args.quick)
        return 0
    if args.attention:
        attention_table(args.quick)
        return 0

    todo = [s for s in steps(args.quick) if not args.only or s.name in args.only]
    if args.dry_run:
        for s in todo:
            print(f"{s.name}: {shown(s.argv)}  (timeout {args.timeout or s.timeout_s} s)")
        return 0

    r = subprocess.run([PY, ME, "--probe"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"gpu_all.py: cannot start jax: {tail(r.stderr, 1) or 'no output'}", file=sys.stderr)
        return 2
    info = json.loads(r.stdout.strip().splitlines()[-1])
    if info["backend"] != "gpu" and not args.allow_cpu:
        print(f"gpu_all.py: jax's backend is {info['backend']!r}, not 'gpu' (--dry-run lists the commands, "
              f"--allow-cpu runs them anyway)", file=sys.stderr)
        return 2

    out = Path(args.out)
    base = out.read_text() if out.exists() else ""
    section = section_header(info, time.strftime("%Y-%m-%d"), args.quick)
    print(section.strip(), flush=True)
    failed = 0
    for s in todo:
        timeout = args.timeout or s.timeout_s
        print(f"\n== {s.name}: {shown(s.argv)}", flush=True)
        res = run_step(s, timeout)
        block = step_block(s, res, timeout)
        print(block, flush=True)
        failed += res["rc"] != 0
        section += "\n" + block
        write_report(out, base, section)  # after every step: a run cut short keeps what finished
    print(f"{len(todo) - failed}/{len(todo)} steps ok; appended to {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
