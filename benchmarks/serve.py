"""Serving benchmark: N concurrent streaming clients against the OpenAI-compatible server.

    python benchmarks/serve.py [--model DIR] [--clients 1 4 16] [--requests 3] [--rate 4] [--url URL]

Without --url it serves --model (default: the default model, SmolLM2-135M-Instruct) in this process
(uvicorn on a free port, --max-batch slots), compiling every program first. Requests arrive as a
Poisson process (--rate per second) with at most N in flight, each a streamed completion drawn from
a small fixed mix of prompts and output lengths (greedy). Per N it prints requests/s, output
tokens/s, time to first token and inter-token latency (p50, p99). A token's inter-token latency is
the gap since the previous chunk, shared by the tokens that chunk carries.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time

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


async def one_request(client, prompt, max_tokens):
    """Streams one completion; returns (ttft, inter-token gaps, output tokens, seconds)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "return_token_ids": True}
    t0 = time.perf_counter()
    last, ttft, gaps, n = t0, None, [], 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            k = len(choices[0].get("token_ids") or ())
            if not k:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - t0
                k_rest = k - 1  # the first chunk's other tokens came with it
                gaps += [0.0] * k_rest
            else:
                gaps += [(now - last) / k] * k
            last, n = now, n + k
    return ttft, gaps, n, time.perf_counter() - t0


async def run_level(url, clients, n_requests, rate, seed=0):
    import httpx

    rng = random.Random(seed)
    mix = [MIX[i % len(MIX)] for i in range(n_requests)]
    gate = asyncio.Semaphore(clients)
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as c:
        async def client_request(delay, prompt, max_tokens):
            await asyncio.sleep(delay)
            async with gate:
                results.append(await one_request(c, prompt, max_tokens))

        t, delays = 0.0, []
        for _ in mix:
            t += rng.expovariate(rate)  # Poisson arrivals
            delays.append(t)
        t0 = time.perf_counter()
        await asyncio.gather(*(client_request(d, p, m) for d, (p, m) in zip(delays, mix)))
        wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in results])
    itl = np.array([g for r in results for g in r[1]] or [0.0])
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "wall_s": wall, "req_s": len(results) / wall,
            "tok_s": tokens / wall, "ttft_p50": np.percentile(ttft, 50), "ttft_p99": np.percentile(ttft, 99),
            "itl_p50": np.percentile(itl, 50), "itl_p99": np.percentile(itl, 99), "tokens": tokens}


def serve_in_process(args):
    """Loads the model, compiles, serves it on a free port in a thread; returns (url, stop)."""
    import socket
    import threading

    import uvicorn

    import llama_jax
    from llama_jax.default_model import default_model_path
    from llama_jax.scheduler import Scheduler
    from llama_jax.server import create_app

    llama = llama_jax.load(args.model or default_model_path())
    sched = Scheduler(llama, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                      decode_steps=args.decode_steps)
    t = time.perf_counter()
    sched.warmup()
    print(f"compiled in {time.perf_counter() - t:.1f}s: {Scheduler.compiled_programs()}")
    sched.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(llama, scheduler=sched), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop():
        server.should_exit = True
        thread.join()
        sched.stop()

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running server (e.g. `llama-jax serve` on a GPU); default: serve in-process")
    p.add_argument("--model", help="model directory to serve in-process (default: the default model)")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=3, help="requests per client (at least 6 per level)")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson arrival rate, requests per second")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--decode-steps", type=int, default=4)
    args = p.parse_args(argv)

    url, stop = (args.url, lambda: None) if args.url else serve_in_process(args)
    try:
        asyncio.run(run_level(url, 1, 2, args.rate))  # warm the HTTP path too
        rows = [asyncio.run(run_level(url, n, max(6, n * args.requests), args.rate)) for n in args.clients]
    finally:
        stop()
    if args.url:
        print(f"\nserver: {args.url}, arrivals {args.rate}/s")
    else:
        import jax

        dev = jax.devices()[0]
        print(f"\nserver: in-process, device: {dev.platform} ({dev.device_kind}), max batch {args.max_batch}, "
              f"decode steps per call {args.decode_steps}, arrivals {args.rate}/s")
    print("| clients | requests | req/s | output tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['req_s']:.2f} | {r['tok_s']:.1f} | "
              f"{r['ttft_p50'] * 1e3:.0f} ms | {r['ttft_p99'] * 1e3:.0f} ms | {r['itl_p50'] * 1e3:.1f} ms | "
              f"{r['itl_p99'] * 1e3:.1f} ms |")


if __name__ == "__main__":
    main()
