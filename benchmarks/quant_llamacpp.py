"""Decode speed of the default model (SmolLM2-135M-Instruct) at each precision, ours against float32
and against llama.cpp on the same weights, same run.

    python benchmarks/quant_llamacpp.py [--llamacpp-python /tmp/lcpvenv/bin/python]
        [--prompt-tokens 16] [--new-tokens 64] [--repeats 3] [--precisions Q4_1,int4,int8,float32] [--work-dir DIR]

Ours (`load` of the default model, the CPU backend as `load` picks it, greedy, batch 1):
- Q4_1: the model as `load` reads it, its GGUF blocks kept (Q4_1 layers, Q8_0 embedding and head);
- float32: those weights dequantized (what the default model was before issue 25);
- int8, int4: that float32 model quantized as `load(..., quantize=)` does (round to nearest: int8
  per output channel, int4 in groups of 32 with minimums; embedding and head int8).
llama.cpp (optional, --llamacpp-python: an interpreter with llama-cpp-python, see below; this same
file run as a child process, 2 threads) runs the model's own GGUF for the Q4_1 and int4 rows, and
Q8_0 and F32 files its quantizer writes from it into --work-dir once for the int8 and float32 rows.
Both decode `--new-tokens` tokens after the same random `--prompt-tokens`-token prompt, timed from the
first new token to the last (compilation and warm-up excluded), and the time to that first token
from the call (ours: `Llama.generate`'s time_to_first_token_s, its engine's setup included; llama.cpp:
`Llama.generate` to its first token). Rounds alternate between the two and the table shows medians:
decode tokens/s (ours, ours over our float32, llama.cpp, ours over llama.cpp), then the first token
in ms (ours, llama.cpp).

llama-cpp-python from its sdist, for an AVX2 CPU (its default native build crashed on one with AMX;
add -DGGML_AVX512=ON where the CPU has it):
    python3 -m venv /tmp/lcpvenv
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF \\
      -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF" \\
      /tmp/lcpvenv/bin/pip install --no-binary llama-cpp-python llama-cpp-python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

THREADS = 2
# The llama.cpp file of each row (None: the model's own, Q4_1).
PRECISIONS = {"Q4_1": None, "int4": None, "int8": "Q8_0", "float32": "F32"}
LLAMACPP_FTYPES = {"Q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "F32": "LLAMA_FTYPE_ALL_F32"}


# --- The llama.cpp side: runs under --llamacpp-python, imports only llama_cpp and the stdlib ---------


def _llamacpp_file(src: str, ftype: str | None, work_dir: str, request: dict) -> str:
    """The GGUF of one row: src itself, or src requantized by llama.cpp to `ftype` (once)."""
    import ctypes

    import llama_cpp

    if ftype is None:
        return src
    dst = os.path.join(work_dir, f"{os.path.splitext(os.path.basename(src))[0]}.{ftype}.gguf")
    if not os.path.exists(dst):
        os.makedirs(work_dir, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, LLAMACPP_FTYPES[ftype])
        params.allow_requantize = True  # the source is Q4_1: dequantized, then written as ftype
        params.nthread = request["threads"]
        tmp = dst + ".part"
        if llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), ctypes.byref(params)):
            raise RuntimeError(f"llama.cpp could not write {ftype} from {src}")
        os.replace(tmp, dst)
    return dst


def _llamacpp_rate(llm, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(seconds to the first new token, greedy decode tokens/s from the first new token to the last)."""
    # Forget the previous call's tokens: llama-cpp-python would otherwise reuse the KV cache of the
    # prompt they share, and its first token would come after a single token's evaluation.
    llm.reset()
    start, first = time.perf_counter(), None
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, reset=True)):
        if i == 0:
            first = time.perf_counter()
        if i + 1 == new_tokens:
            return first - start, (new_tokens - 1) / (time.perf_counter() - first)
    raise AssertionError("unreachable: generate does not stop by itself")


def llamacpp_main(request: dict) -> None:
    """One round: for each precision, load its GGUF, warm up, time a decode; prints JSON."""
    import llama_cpp

    rates = {}
    for precision in request["precisions"]:
        if precision == "int4" and "Q4_1" in rates:  # the same file
            rates[precision] = rates["Q4_1"]
            continue
        path = _llamacpp_file(request["gguf"], PRECISIONS[precision], request["work_dir"], request)
        llm = llama_cpp.Llama(path, n_threads=request["threads"], n_threads_batch=request["threads"],
                              n_ctx=len(request["prompt"]) + request["new_tokens"] + 16, verbose=False)
        _llamacpp_rate(llm, request["prompt"], 4)  # warm-up
        rates[precision] = _llamacpp_rate(llm, request["prompt"], request["new_tokens"])
        llm.close()
    print(json.dumps(rates))


# --- Ours and the comparison ---------------------------------------------------------------------------


def llamacpp_round(python: str, request: dict) -> dict:
    done = subprocess.run([python, os.path.abspath(__file__), "--llamacpp-child", json.dumps(request)],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"llama.cpp run failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def our_rate(model, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """As `_llamacpp_rate`, from `Llama.generate`'s timings."""
    timings = model.generate([prompt], max_new_tokens=new_tokens, stop_token_ids=[])[0].timings
    return timings["time_to_first_token_s"], timings["decode_tokens_per_s"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llamacpp-python", help="an interpreter with llama-cpp-python (omit: ours only)")
    p.add_argument("--llamacpp-threads", type=int, default=THREADS,
                   help="llama.cpp's threads (its spinning barriers collapse when another process holds a core)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="the random prompt's length")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="comma-separated: " + ",".join(PRECISIONS))
    p.add_argument("--work-dir", help="where llama.cpp's Q8_0 and F32 files go (default: the llama-jax cache)")
    p.add_argument("--llamacpp-child", help=argparse.SUPPRESS)  # the child's request, JSON
    args = p.parse_args(argv)
    if args.llamacpp_child:
        llamacpp_main(json.loads(args.llamacpp_child))
        return 0
    if args.prompt_tokens < 1 or args.new_tokens < 2:
        p.error("--prompt-tokens must be >= 1 and --new-tokens >= 2 (a rate needs two tokens)")
    precisions = args.precisions.split(",")
    if unknown := set(precisions) - set(PRECISIONS):
        p.error(f"--precisions: unknown {', '.join(sorted(unknown))} (choose from {', '.join(PRECISIONS)})")

    import jax.numpy as jnp
    import numpy as np

    import llama_jax
    from llama_jax import api, default_model, model as model_lib, ops, quant
    from llama_jax.paths import cache_dir

    gguf = default_model.gguf_path()
    kept = llama_jax.load(default_model.default_model_path())
    dense = quant.dequantize_params(kept.params, jnp.float32)
    models = {}
    for name in precisions:
        if name == "Q4_1":
            models[name] = kept
        else:
            params = dense if name == "float32" else quant.quantize_params(dense, name, model_lib.LINEAR_WEIGHTS)
            models[name] = api.from_params(kept.config, params, kept.runtime)
    vocab = kept.config.vocab_size
    prompt = np.random.RandomState(0).randint(3, vocab, args.prompt_tokens).tolist()
    for model in models.values():  # compile
        our_rate(model, prompt, 4)
    request = dict(gguf=gguf, precisions=precisions, prompt=prompt, new_tokens=args.new_tokens, threads=args.llamacpp_threads,
                   work_dir=args.work_dir or os.path.join(cache_dir(), "llamacpp"))
    theirs, ours = {n: [] for n in precisions}, {n: [] for n in precisions}
    for _ in range(args.repeats):
        if args.llamacpp_python:
            for name, (first, rate) in llamacpp_round(args.llamacpp_python, request).items():
                theirs[name].append((first, rate))
        for name, model in models.items():
            ours[name].append(our_rate(model, prompt, args.new_tokens))

    print(f"SmolLM2-135M-Instruct decode, greedy, {args.new_tokens} tokens after {args.prompt_tokens}, batch 1, median "
          f"of {args.repeats} alternating rounds; llama-jax: {ops.describe(kept.runtime)}; llama.cpp: "
          f"{args.llamacpp_threads} threads")

    def median(runs, i):  # of the rounds' (first token s, tokens/s)
        return statistics.median(r[i] for r in runs)

    base = median(ours["float32"], 1) if ours.get("float32") else None
    header = (f"{'precision':<10}{'ours tok/s':>11}{'vs f32':>8}{'llama.cpp file':>16}{'llama.cpp':>11}{'ratio':>8}"
              f"{'ours 1st ms':>13}{'llama.cpp 1st ms':>18}")
    print(f"{header}\n{'-' * len(header)}")
    for name in precisions:
        mine = median(ours[name], 1)
        vs_f32 = f"{mine / base:>7.2f}x" if base else f"{'-':>8}"
        line = f"{name:<10}{mine:>11.1f}{vs_f32}{PRECISIONS[name] or 'Q4_1':>16}"
        other = median(theirs[name], 1) if theirs[name] else None
        line += f"{other:>11.1f}{mine / other:>7.2f}x" if other else f"{'-':>11}{'-':>8}"
        line += f"{1e3 * median(ours[name], 0):>13.1f}"
        line += f"{1e3 * median(theirs[name], 0):>18.1f}" if other else f"{'-':>18}"
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
