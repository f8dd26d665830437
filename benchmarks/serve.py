"""Serving benchmarks: the OpenAI-compatible server under issue #23's loads, one table per case.

    python benchmarks/serve.py [--case CASE ...] [--model DIR] [--url URL] [--max-batch 16] [--max-seq-len 2048]

Without --url each case serves --model (default: the default model, SmolLM2-135M-Instruct) in this
process (uvicorn on a free port) from an engine of its own, its short-request programs compiled
first, and runs each load once unmeasured before measuring it, so that programs compiled on first
use (long prefill chunks, batched prefills) are not timed. Requests are streamed completions, greedy;
the new cases send token-id prompts of random ids and `ignore_eos`, so every request has the
asked length. CASE (default poisson; `all` runs every one):

- poisson (`--clients 1 4 16 --requests 3 --rate 4`): requests from a fixed mix of six text
  prompts arrive as a Poisson process with at most N in flight; per N: requests/s, output tokens/s,
  time to first token and inter-token latency (p50, p99; a chunk's gap is shared by its tokens).
- mixed (`--mixed-requests 64`): that many requests at once, prompts of 16 to 1024 tokens and
  answers of 16 to 256 (log-uniform); throughput, and the KV waste: every 50 ms, blocks in use x
  block size against the tokens the running requests hold (prompt and tokens so far), at steady
  state (the batch full) and over the run. Target: waste at most 4%. Needs the in-process engine.
- shared-prefix (`--system-tokens 1500 --users 16`): one system prompt, each user's own 16-token
  question after it; the first request alone, then the other users together, then as many more one
  at a time (distinct questions); time to first token against the first's. Target: 0.2x or less.
- chat (`--turns 8`): one conversation, each turn's prompt the last one's, its answer (64 tokens)
  and a new 32-token user message; time to first token per turn, on a server with the prefix cache
  and one without. Needs the in-process engine.
- single: one 64-token request (16-token prompt) through HTTP to `llama-jax serve` in a process of
  its own (or --url) against `Llama.generate` of the same prompt in this process (medians of 3): time to first token, decode tokens/s (after the
  first token) and end-to-end tokens/s (64 / seconds in all). Target: HTTP end to end at least
  0.9x generate (the issue reads it against generate's decode tokens/s; both are printed).
- concurrent: 4 such requests one at a time, then together, to the same server; aggregate output
  tokens/s. Target:
  together at least 3x one at a time.
- json_schema: 64-token greedy requests plain (ignore_eos) and under a JSON schema (an array longer
  than the answer, so both run to max_tokens), interleaved: decode tokens/s per request at 1 row, 4
  rows, and of 3 plain rows beside 1 constrained; and a new schema's grammar compile time. Target:
  constrained decoding costs at most 10% (ratio >= 0.90).
- startup: `llama-jax serve` (--model, or the default model) started twice with one fresh JAX
  compilation cache: seconds from start to /health 200 empty (cold) and filled (warm). Target: cold
  within 30 s on 2 CPU cores, warm faster.

Each table's ratios are against the reference measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

import numpy as np

# (prompt, max_tokens): short and long prompts, short and long answers. The model may stop earlier.
MIX = [
    ("The capital of France is", 16),
    ("Write a short story about a robot who learns to paint. Once upon a time,", 64),
    ("List three facts about the Moon:\n1.", 32),
    ("Here is a long description of a quiet village by the sea, its harbour, its fishermen, the market on "
     "Saturdays, the old lighthouse on the cliff and the church bells that ring every evening at six. "
     "In the summer", 48),
    ("def fibonacci(n):", 32),
    ("Q: Why is the sky blue?\nA:", 24),
]
# Random prompt ids come from here: ordinary tokens in every Llama 3 / SmolLM2 vocabulary (no specials).
IDS = (100, 10_000)
NEW_TOKENS = 64  # the single and concurrent cases' request length (the issue's)
PROMPT_TOKENS = 16
CONCURRENT = 4


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*IDS) for _ in range(n)]


def pct(x, q) -> float:
    return float(np.percentile(np.asarray(x, dtype=float), q))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def table(header: list[str], rows: list[list]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + " ---: |" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")


# --- Requests ------------------------------------------------------------------------------------


async def stream(client, prompt, max_tokens: int, **extra) -> dict:
    """Streams one greedy completion; returns its ttft, inter-token gaps (one per token; a chunk's gap
    is shared by the tokens it carries), token ids, seconds, and prompt tokens found cached."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True, **extra}
    t0 = time.perf_counter()
    last, ttft, gaps, ids, cached = t0, None, [], [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                cached = (chunk["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0)
            new = (chunk.get("choices") or [{}])[0].get("token_ids") or []
            if not new:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
                gaps += [0.0] * (len(new) - 1)  # the first chunk's other tokens came with it
            else:
                gaps += [(now - last) / len(new)] * len(new)
            last = now
            ids += new
    return {"ttft": ttft, "gaps": gaps, "ids": ids, "seconds": time.perf_counter() - t0, "cached": cached}


async def exact(client, prompt, max_tokens: int) -> dict:
    """`stream` of a request that runs to max_tokens (ignore_eos)."""
    return await stream(client, prompt, max_tokens, ignore_eos=True)


def http_client(url: str, connections: int):
    import httpx

    return httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=connections + 4))


# --- The server ----------------------------------------------------------------------------------


class Target(NamedTuple):
    url: str
    engine: object | None  # the in-process EngineThread (None with --url)


_model = None


def load_model(args):
    global _model
    if _model is None:
        import llama_jax
        from llama_jax.default_model import default_model_path

        _model = llama_jax.load(args.model or default_model_path())
    return _model


@contextlib.contextmanager
def serving(args, **options):
    """Yields a Target: --url as given, or the model served in this process on a free port by an
    engine with the benchmark's options (and `options`, e.g. prefix_caching=False), compiled first."""
    if args.url:
        yield Target(args.url, None)
        return
    import jax
    import uvicorn

    from llama_jax.engine import Engine, EngineThread
    from llama_jax.server import create_app

    llama = load_model(args)
    options = dict(max_batch=args.max_batch, max_seq_len=args.max_seq_len, decode_steps=args.decode_steps,
                   kv_cache_tokens=args.kv_cache_tokens) | options
    engine = Engine(llama, **options)
    thread = EngineThread(engine, max_queue=256)
    t = time.perf_counter()
    compiled = thread.warmup()
    dev = jax.devices()[0]
    print(f"server: in-process on {dev.platform} ({dev.device_kind}); {engine.pool.usable} KV blocks of "
          f"{engine.block_size} tokens, max batch {engine.max_batch}, max seq len {engine.max_seq_len}, "
          f"decode steps {engine.decode_steps}, prefix caching {engine.pool.prefix_caching}; warmup "
          f"{time.perf_counter() - t:.1f}s ({compiled['prefill']} prefill, {compiled['decode']} decode programs "
          f"traced)", flush=True)
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(llama, engine=thread), log_level="warning"))
    th = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    th.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield Target(f"http://127.0.0.1:{sock.getsockname()[1]}", thread)
    finally:
        server.should_exit = True
        th.join()
        thread.stop()


def kv_sample(thread) -> tuple[int, int, int]:
    """(running requests, KV blocks in use, tokens the running requests hold) now. Read from the
    engine's thread without a lock: a sample can straddle a step, which is noise, not bias."""
    engine = thread.engine
    running = list(engine.scheduler.running)
    return len(running), engine.pool.used(), sum(len(s.tokens) for s in running)


# --- Cases -----------------------------------------------------------------------------------------


def case_poisson(args):
    print("\n## poisson: N concurrent streaming clients, Poisson arrivals "
          f"({args.rate}/s), a fixed mix of six text prompts")

    async def level(url, clients, n_requests, seed=0):
        rng = random.Random(seed)
        mix = [MIX[i % len(MIX)] for i in range(n_requests)]
        gate = asyncio.Semaphore(clients)
        results = []
        async with http_client(url, clients) as c:
            async def one(delay, prompt, max_tokens):
                await asyncio.sleep(delay)
                async with gate:
                    results.append(await stream(c, prompt, max_tokens))

            t, delays = 0.0, []
            for _ in mix:
                t += rng.expovariate(args.rate)  # Poisson arrivals
                delays.append(t)
            t0 = time.perf_counter()
            await asyncio.gather(*(one(d, p, m) for d, (p, m) in zip(delays, mix)))
            wall = time.perf_counter() - t0
        ttft = [r["ttft"] for r in results]
        itl = [g for r in results for g in r["gaps"]] or [0.0]
        tokens = sum(len(r["ids"]) for r in results)
        return [clients, len(results), f"{len(results) / wall:.2f}", f"{tokens / wall:.1f}", ms(pct(ttft, 50)),
                ms(pct(ttft, 99)), f"{pct(itl, 50) * 1e3:.1f} ms", f"{pct(itl, 99) * 1e3:.1f} ms"]

    with serving(args) as target:
        asyncio.run(level(target.url, 1, 2))  # warm the HTTP path too
        rows = [asyncio.run(level(target.url, n, max(6, n * args.requests))) for n in args.clients]
    table(["clients", "requests", "req/s", "output tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99"], rows)


def case_mixed(args):
    n = args.mixed_requests
    print(f"\n## mixed: {n} requests at once, prompts of 16-1024 tokens, answers of 16-256 (log-uniform)")
    log_uniform = lambda rng, lo, hi: int(round(math.exp(rng.uniform(math.log(lo), math.log(hi)))))  # noqa: E731

    def load(seed):
        rng = random.Random(seed)
        return [(random_ids(rng, log_uniform(rng, 16, 1024)), log_uniform(rng, 16, 256)) for _ in range(n)]

    async def run(target, reqs, samples):
        done = asyncio.Event()

        async def sample():
            while not done.is_set():
                samples.append(kv_sample(target.engine))
                await asyncio.sleep(0.05)

        async with http_client(target.url, n) as c:
            sampler = asyncio.create_task(sample()) if target.engine else None
            t0 = time.perf_counter()
            results = await asyncio.gather(*(exact(c, p, m) for p, m in reqs))
            wall = time.perf_counter() - t0
            done.set()
            if sampler:
                await sampler
        return results, wall

    with serving(args) as target:
        asyncio.run(run(target, load(1), []))  # compiles the prefill shapes this mix needs
        before = target.engine.stats().preemptions if target.engine else 0
        reqs, samples = load(0), []
        results, wall = asyncio.run(run(target, reqs, samples))
        preempted = target.engine.stats().preemptions - before if target.engine else "n/a"
        block_size = target.engine.engine.block_size if target.engine else 0
    out = sum(len(r["ids"]) for r in results)
    prompt = sum(len(p) for p, _ in reqs)
    ttft = [r["ttft"] for r in results]

    def waste(rows):  # of the blocks in use, the share no token fills
        held, used = sum(r[2] for r in rows), sum(r[1] for r in rows) * block_size
        return f"{100 * (1 - held / used):.1f}%" if used else "n/a"

    steady = [s for s in samples if s[0] == args.max_batch]
    worst = max((1 - s[2] / (s[1] * block_size) for s in steady if s[1]), default=None)
    table(["requests", "prompt tokens", "output tokens", "wall", "req/s", "output tok/s", "TTFT p50", "TTFT p99",
           "preemptions"],
          [[n, prompt, out, f"{wall:.1f} s", f"{n / wall:.2f}", f"{out / wall:.1f}", ms(pct(ttft, 50)),
            ms(pct(ttft, 99)), preempted]])
    print()
    if not samples:
        print("KV waste: needs the in-process engine (no --url)")
        return
    table(["KV samples", "of them steady (batch full)", "mean blocks used (steady)", "mean tokens held (steady)",
           "waste, steady", "waste, worst steady sample", "waste, whole run", "target"],
          [[len(samples), len(steady), f"{np.mean([s[1] for s in steady]):.0f}" if steady else "n/a",
            f"{np.mean([s[2] for s in steady]):.0f}" if steady else "n/a", waste(steady),
            "n/a" if worst is None else f"{100 * worst:.1f}%", waste(samples), "<= 4%"]])


def case_shared_prefix(args):
    users, n_sys = args.users, args.system_tokens
    print(f"\n## shared-prefix: a {n_sys}-token system prompt, {users} users each with a 16-token question")

    async def run(url, seed):
        rng = random.Random(seed)
        system = random_ids(rng, n_sys)
        questions = [system + random_ids(rng, 16) for _ in range(2 * users - 1)]
        async with http_client(url, users) as c:
            first = await exact(c, questions[0], 16)
            t0 = time.perf_counter()
            together = await asyncio.gather(*(exact(c, q, 16) for q in questions[1:users]))
            wall = time.perf_counter() - t0
            alone = [await exact(c, q, 16) for q in questions[users:]]
        return first, together, wall, alone

    with serving(args, max_batch=max(args.max_batch, users)) as target:
        asyncio.run(run(target.url, 1))  # compiles the long prefill and the batched short ones
        first, together, wall, alone = asyncio.run(run(target.url, 0))
    f = first["ttft"]
    rows = [["first, alone", 1, first["cached"], ms(f), ms(f), "1.00", "1.00", ""]]
    for name, rs in ((f"the other {users - 1}, together", together), (f"{users - 1} more, one at a time", alone)):
        t = [r["ttft"] for r in rs]
        rows.append([name, len(rs), int(np.median([r["cached"] for r in rs])), ms(pct(t, 50)), ms(max(t)),
                     f"{pct(t, 50) / f:.2f}", f"{max(t) / f:.2f}", "<= 0.20"])
    table(["requests", "n", "cached prompt tokens (median)", "TTFT p50", "TTFT max", "p50 x first", "max x first",
           "target"], rows)
    print(f"\n(together: all {users - 1} done in {wall:.2f} s)")


def case_chat(args):
    if args.url:
        raise SystemExit("chat: needs the in-process engine (a server with and one without the prefix cache)")
    turns = args.turns
    print(f"\n## chat: {turns} turns (256-token system prompt, 32-token user messages, 64-token answers), "
          "time to first token with and without the prefix cache")

    async def conversation(url, seed):
        rng = random.Random(seed)
        prompt, out = random_ids(rng, 256), []
        async with http_client(url, 1) as c:
            for _ in range(turns):
                prompt = prompt + random_ids(rng, 32)
                r = await exact(c, prompt, 64)
                out.append((len(prompt), r))
                prompt = prompt + r["ids"]
        return out

    runs = {}
    for caching in (True, False):
        with serving(args, prefix_caching=caching) as target:
            asyncio.run(conversation(target.url, 1))  # compiles each turn's prefill shape
            runs[caching] = asyncio.run(conversation(target.url, 0))
    rows = []
    for turn, ((n, on), (_, off)) in enumerate(zip(runs[True], runs[False]), 1):
        same = "yes" if on["ids"] == off["ids"] else "NO"
        rows.append([turn, n, on["cached"], ms(on["ttft"]), ms(off["ttft"]), f"{on['ttft'] / off['ttft']:.2f}", same])
    table(["turn", "prompt tokens", "cached (cache on)", "TTFT cache on", "TTFT cache off", "on / off",
           "same answer"], rows)


def outside(args):
    """The server the single and concurrent cases measure from outside: --url, or `llama-jax serve`
    in a process of its own (a client in the server's process would share its interpreter)."""
    if args.url:
        return contextlib.nullcontext((args.url, None, None))
    return serve_process(args)


def case_single(args):
    if args.url:
        raise SystemExit("single: needs the model in this process (its reference is Llama.generate)")
    print(f"\n## single: one {NEW_TOKENS}-token request ({PROMPT_TOKENS}-token prompt), HTTP to `llama-jax serve` "
          "against Llama.generate in this process (medians of 3)")
    llama = load_model(args)
    prompt = random_ids(random.Random(0), PROMPT_TOKENS)
    llama.generate([prompt], max_new_tokens=NEW_TOKENS, stop_token_ids=[])  # compiles
    ref = []
    for _ in range(3):
        t0 = time.perf_counter()
        [c] = llama.generate([prompt], max_new_tokens=NEW_TOKENS, stop_token_ids=[])
        ref.append((c.timings["time_to_first_token_s"], c.timings["decode_tokens_per_s"],
                    len(c.token_ids) / (time.perf_counter() - t0)))

    async def run(url):
        async with http_client(url, 1) as c:
            await exact(c, prompt, NEW_TOKENS)  # warm
            out = []
            for _ in range(3):
                r = await exact(c, prompt, NEW_TOKENS)
                out.append((r["ttft"], (len(r["ids"]) - 1) / (r["seconds"] - r["ttft"]), len(r["ids"]) / r["seconds"]))
                assert len(r["ids"]) == NEW_TOKENS, len(r["ids"])
            return out

    with outside(args) as (url, _, _):
        http = asyncio.run(run(url))
    g, h = [[statistics.median(x) for x in zip(*rs)] for rs in (ref, http)]
    table(["path", "TTFT", "decode tok/s", "end-to-end tok/s"],
          [["Llama.generate", ms(g[0]), f"{g[1]:.1f}", f"{g[2]:.1f}"],
           ["HTTP (streamed)", ms(h[0]), f"{h[1]:.1f}", f"{h[2]:.1f}"],
           ["HTTP / generate", f"{h[0] / g[0]:.2f}", f"{h[1] / g[1]:.2f}", f"{h[2] / g[2]:.2f}"]])
    print(f"\ntarget: HTTP end to end >= 0.9x generate: {h[2] / g[2]:.2f}x end to end; "
          f"{h[2] / g[1]:.2f}x generate's decode tok/s (the issue's measure)")


def case_concurrent(args):
    print(f"\n## concurrent: {CONCURRENT} greedy {NEW_TOKENS}-token requests one at a time, then together")
    rng = random.Random(0)
    prompts = [random_ids(rng, PROMPT_TOKENS) for _ in range(CONCURRENT)]

    async def run(url):
        async with http_client(url, CONCURRENT) as c:
            await asyncio.gather(*(exact(c, p, NEW_TOKENS) for p in prompts))  # warm (batched prefill)
            t0 = time.perf_counter()
            alone = [await exact(c, p, NEW_TOKENS) for p in prompts]
            t1 = time.perf_counter()
            together = await asyncio.gather(*(exact(c, p, NEW_TOKENS) for p in prompts))
            t2 = time.perf_counter()
        return (alone, t1 - t0), (together, t2 - t1)

    with outside(args) as (url, _, _):
        (alone, wa), (together, wt) = asyncio.run(run(url))
    rate = lambda rs, wall: sum(len(r["ids"]) for r in rs) / wall  # noqa: E731
    same = all(a["ids"] == b["ids"] for a, b in zip(alone, together))
    table(["mode", "requests", "wall", "aggregate tok/s", "TTFT p50", "x one at a time", "target"],
          [["one at a time", CONCURRENT, f"{wa:.2f} s", f"{rate(alone, wa):.1f}",
            ms(pct([r["ttft"] for r in alone], 50)), "1.00", ""],
           ["together", CONCURRENT, f"{wt:.2f} s", f"{rate(together, wt):.1f}",
            ms(pct([r["ttft"] for r in together], 50)), f"{rate(together, wt) / rate(alone, wa):.2f}", ">= 3.00"]])
    print(f"\n(greedy outputs together equal to alone: {'yes' if same else 'NO'})")


@contextlib.contextmanager
def serve_process(args, cache: str | None = None, *, defaults: bool = False):
    """`llama-jax serve` (--model, or the default model) in a process of its own on a free port, with
    the benchmark's --max-batch and --max-seq-len (or the command's defaults), and JAX compilation
    cache dir `cache`: yields (url, seconds from start to /health 200, the line saying what it
    compiled); stopped at the end."""
    import httpx

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    sizes = [] if defaults else ["--max-batch", str(args.max_batch), "--max-seq-len", str(args.max_seq_len),
                                 "--decode-steps", str(args.decode_steps)]
    cmd = [sys.executable, "-m", "llama_jax.cli", "serve", "--port", str(port), *sizes] + (
        ["--model", args.model] if args.model else [])
    env = os.environ | ({"JAX_COMPILATION_CACHE_DIR": cache} if cache else {})
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while True:
                if proc.poll() is not None:
                    err.seek(0)
                    raise SystemExit(f"`llama-jax serve` exited with {proc.returncode}:\n{err.read()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                        break
                if time.perf_counter() - t0 > args.startup_timeout:
                    raise SystemExit(f"`llama-jax serve` not ready within {args.startup_timeout} s")
                time.sleep(0.1)
            ready = time.perf_counter() - t0
            err.seek(0)
            compiled = re.search(r"prepared .*? in [\d.]+s", err.read())
            yield f"http://127.0.0.1:{port}", ready, compiled.group(0) if compiled else "?"
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def case_startup(args):
    from llama_jax.default_model import default_model_path

    default_model_path()  # converted before the clock starts
    print("\n## startup: `llama-jax serve` (its default sizes) to /health 200, with an empty then a filled JAX "
          "compilation cache")
    with tempfile.TemporaryDirectory() as cache:
        with serve_process(args, cache, defaults=True) as (_, *cold):
            pass
        files = sum(len(f) for _, _, f in os.walk(cache))
        with serve_process(args, cache, defaults=True) as (_, *warm):
            pass
    table(["start", "compilation cache", "ready", "x cold", "at start", "target"],
          [["cold", "empty", f"{cold[0]:.1f} s", "1.00", cold[1], "<= 30 s"],
           ["warm", f"{files} files", f"{warm[0]:.1f} s", f"{warm[0] / cold[0]:.2f}", warm[1], "< 1.00"]])


# json_schema's schema: an array of small integers longer than any answer, so a constrained request
# runs to max_tokens as an ignore_eos one does, and the two decode the same number of tokens.
NUMBERS = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 10_000}
CITY = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                                         "population": {"type": "integer"}},
        "required": ["city", "country", "population"]}


def case_json_schema(args):
    print(f"\n## json_schema: {NEW_TOKENS}-token greedy requests ({PROMPT_TOKENS}-token prompts), plain (ignore_eos) "
          f"and under a JSON schema, interleaved, {args.repeats} rounds: decode tok/s per request (after the first "
          "token; median over requests and rounds)")
    rng = random.Random(0)
    prompts = [random_ids(rng, PROMPT_TOKENS) for _ in range(CONCURRENT)]
    fmt = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": NUMBERS}}
    plain, constrained = {"ignore_eos": True}, {"response_format": fmt}
    # name: (rows, only the first row under the schema)
    loads = {"1 row": (1, False), f"{CONCURRENT} rows": (CONCURRENT, False),
             f"{CONCURRENT} rows, one under the schema": (CONCURRENT, True)}

    async def round_(c, extras):
        rs = await asyncio.gather(*(stream(c, p, NEW_TOKENS, **e) for p, e in zip(prompts, extras)))
        for r in rs:
            assert len(r["ids"]) == NEW_TOKENS, len(r["ids"])
        return [(len(r["ids"]) - 1) / (r["seconds"] - r["ttft"]) for r in rs]

    async def run(url):
        out = {}
        async with http_client(url, CONCURRENT) as c:
            for name, (n, one) in loads.items():
                kinds = {"plain": [plain] * n,
                         "json_schema": [constrained] + [plain if one else constrained] * (n - 1)}
                for extras in kinds.values():
                    await round_(c, extras)  # compiles
                rates = {k: [] for k in kinds}
                for _ in range(args.repeats):
                    for k, extras in kinds.items():
                        got = await round_(c, extras)
                        # With one constrained row, the plain rows are what the others pay for it.
                        rates[k] += got[1:] if one and k == "json_schema" else got
                out[name] = {k: statistics.median(v) for k, v in rates.items()}
        return out

    with serving(args) as target:
        got = asyncio.run(run(target.url))
        grammars = target.engine.engine.grammars if target.engine is not None else None
        compile_s = None
        if grammars is not None:
            t = time.perf_counter()
            grammars.compile(json.dumps(CITY))
            compile_s = time.perf_counter() - t
    rows = [[name, f"{r['plain']:.1f}", f"{r['json_schema']:.1f}", f"{r['json_schema'] / r['plain']:.2f}"]
            for name, r in got.items()]
    table(["batch", "plain decode tok/s", "json_schema decode tok/s", "ratio (target >= 0.90)"], rows)
    print("\n(the last row's json_schema column: the plain rows' rate beside the constrained one)")
    if compile_s is not None:
        print(f"grammar compile of a new 3-property object schema: {compile_s * 1e3:.0f} ms (once per schema)")


CASES = {"poisson": case_poisson, "mixed": case_mixed, "shared-prefix": case_shared_prefix, "chat": case_chat,
         "single": case_single, "concurrent": case_concurrent, "startup": case_startup,
         "json_schema": case_json_schema}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", nargs="+", choices=[*CASES, "all"], default=["poisson"])
    p.add_argument("--url", help="a running server (e.g. `llama-jax serve` on a GPU); default: serve in-process")
    p.add_argument("--model", help="model directory to serve in-process (default: the default model)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--kv-cache-tokens", type=int, help="default: the engine's")
    p.add_argument("--decode-steps", type=int, default=8)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="poisson: concurrency levels")
    p.add_argument("--requests", type=int, default=3, help="poisson: requests per client (at least 6 per level)")
    p.add_argument("--rate", type=float, default=4.0, help="poisson: arrivals per second")
    p.add_argument("--mixed-requests", type=int, default=64)
    p.add_argument("--system-tokens", type=int, default=1500)
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--startup-timeout", type=float, default=300)
    p.add_argument("--repeats", type=int, default=3, help="json_schema: measured rounds of each kind")
    args = p.parse_args(argv)
    for name in CASES if "all" in args.case else args.case:
        CASES[name](args)


if __name__ == "__main__":
    main()
