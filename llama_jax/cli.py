"""The `llama-jax` command: one function per subcommand (`convert`, `inspect`, `generate`, `chat`,
`bench`, `train`, `serve`).

Exit codes: 0 done; 2 usage errors (bad arguments, a missing model path, DST in the way);
1 failures caused by the input (a bad checkpoint) or the disk. Errors print one line on stderr,
never a traceback.

`generate`, `chat` and `bench` take `--model PATH` (a converted or Hugging Face directory); without
it they use the default model, SmolLM2-135M-Instruct, converted on first use (llama_jax/default_model.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ATTENTION_IMPLS = ("auto", "xla", "pallas", "mosaic", "cudnn")  # llama_jax.config's, without importing jax to parse
CPU_KERNELS = ("auto", "on", "off")
CPU_KERNELS_HELP = ("the optional C++ CPU backend (pip install 'llama-jax[cpu]'): auto (the default) uses it where "
                     "it serves (CPU, float32, no mesh), on requires it, off never")


class CliError(Exception):
    """An error reported as one line on stderr with exit code `code`."""

    def __init__(self, msg: str, code: int):
        super().__init__(msg)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the default prints the whole usage first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _error(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def first_line(e: BaseException) -> str:
    msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
    return msg.splitlines()[0] if msg.strip() else type(e).__name__


# --- Shared arguments and loading -----------------------------------------------------------------


def checked(kind, test, what):
    """An argparse type: `kind(text)` that must pass `test`, else a usage error saying `what`."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {what}")
        return value
    return parse


def int_at_least(least: int):
    """An argparse type: an integer >= least."""
    return checked(int, lambda n: n >= least, f">= {least}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="a model directory (made by `llama-jax convert`, or Hugging Face safetensors); "
                        "default: SmolLM2-135M-Instruct, prepared on first use")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto",
                   help="default auto: pallas on GPU, xla on CPU")
    p.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="auto", help=CPU_KERNELS_HELP)
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"),
                   help="quantize the weights at load (weight-only, round to nearest; the embedding and head at "
                        "8 bits); weights a checkpoint stores quantized load as they are; default: as stored")


def _add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", metavar="DIR", dest="lora_dir",
                   help="a LoRA adapter in PEFT's format (llama-jax train --lora-rank writes one), merged into the "
                        "model at load")


def _add_speculative_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculative", metavar="ngram|DIR",
                   help="speculative decoding (the same output, fewer forwards where guesses hold): ngram "
                        "proposes the tokens that followed the latest earlier occurrence of the text's last few "
                        "tokens; DIR, a smaller model with the same tokenizer, drafts them; default: none")
    p.add_argument("--num-speculative-tokens", type=int_at_least(1), default=4, metavar="K",
                   help="tokens proposed per step with --speculative (default 4)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=checked(int, lambda n: n >= 1, ">= 1"), default=max_new_tokens,
                   metavar="N", help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=checked(float, lambda t: t >= 0, ">= 0"), default=0.0, metavar="T",
                   help="0 (the default) is greedy")
    p.add_argument("--top-p", type=checked(float, lambda p: 0 < p <= 1, "in (0, 1]"), metavar="P")
    p.add_argument("--top-k", type=checked(int, lambda k: k >= 1, ">= 1"), metavar="K")
    p.add_argument("--seed", type=int, default=0, metavar="S")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def model_path(args) -> str:
    from llama_jax import default_model

    if args.model is None:
        try:
            return default_model.default_model_path()
        except default_model.DefaultModelMissing as e:
            raise CliError(str(e), 2) from None
    path = os.path.abspath(args.model)
    if not os.path.exists(path):
        raise CliError(f"{args.model}: no such model directory", 2)
    if not os.path.isdir(path):
        hint = "; convert it first: llama-jax convert SRC DST" if path.endswith(".gguf") else ""
        raise CliError(f"{args.model}: not a model directory{hint}", 2)
    return path


def _cache_compiled_programs() -> None:
    """Keeps JAX's compiled programs across runs, under $LLAMA_JAX_CACHE/jax-compile (unless
    JAX_COMPILATION_CACHE_DIR says elsewhere): a second `llama-jax generate` skips the XLA compiles,
    which are most of a short run (on 2 CPU cores, about 15 s -> 8 s for 8 tokens)."""
    import jax

    from llama_jax.paths import cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "jax-compile"))


def parse_mesh(text: str | None):
    """--mesh "fsdp=4,tp=2" -> llama_jax.make_mesh(fsdp=4, tp=2) (None without it); raises CliError."""
    if not text:
        return None
    import llama_jax

    sizes = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        if name not in ("dp", "fsdp", "cp", "pp", "tp") or not eq or not value.strip().isdigit():
            raise CliError(f"--mesh {text!r}: expected comma-separated NAME=SIZE with NAME one of dp, fsdp, cp, pp, "
                           "tp (e.g. --mesh fsdp=4,tp=2)", 2)
        sizes[name] = int(value)
    try:
        return llama_jax.make_mesh(**sizes)
    except ValueError as e:
        raise CliError(f"--mesh: {e}", 2) from None


def load_model(args, mesh=None):
    """The Llama that --model, --dtype, --attention-impl, --cpu-kernels and --quantize name (on
    `mesh`); raises CliError."""
    import llama_jax
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.gguf_io import GGUFError
    from llama_jax.safetensors_io import SafetensorsError

    path = model_path(args)
    _cache_compiled_programs()
    try:
        speculative = None
        if getattr(args, "speculative", None):
            speculative = {"method": "ngram", "num_speculative_tokens": args.num_speculative_tokens}
            if args.speculative != "ngram":
                if not os.path.isdir(args.speculative):
                    raise CliError(f"--speculative: {args.speculative}: neither ngram nor a model directory", 2)
                speculative.update(method="draft", model=os.path.abspath(args.speculative))
        return llama_jax.load(path, dtype=args.dtype, attention_impl=args.attention_impl,
                              cpu_kernels=args.cpu_kernels, mesh=mesh, speculative=speculative,
                              quantize=args.quantize, lora=getattr(args, "lora_dir", None),
                              adapters=dict(getattr(args, "lora_modules", None) or ()) or None)
    except FileNotFoundError as e:  # a directory that holds no model
        raise CliError(first_line(e), 2) from None
    except (CheckpointError, GGUFError, SafetensorsError, OSError) as e:
        raise CliError(first_line(e), 1) from None
    except (ValueError, RuntimeError) as e:  # a setting that does not fit: cudnn on a CPU, --cpu-kernels on
        raise CliError(first_line(e), 2) from None


# --- Subcommands ----------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    """llama-jax convert SRC DST [--dtype] [--force] [--allow-extra]"""
    # The command line and default_model reach up into checkpoints_tools; the library proper never does.
    from checkpoints_tools import convert

    return convert.run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    """llama-jax inspect DIR: the config, parameter count, stored dtype and size on disk."""
    import math

    from llama_jax import ops, orbax_io
    from llama_jax.checkpoint import param_shapes
    from llama_jax.config import RuntimeConfig

    path = os.path.abspath(args.path)
    if not os.path.isdir(path):
        return _error(f"{path}: no such directory", 2)
    if not orbax_io.is_converted(path):
        return _error(f"{path}: not a converted checkpoint (no {orbax_io.CONFIG_FILE} and {orbax_io.PARAMS_DIR}/); "
                      "make one with `llama-jax convert`", 2)
    try:
        config = orbax_io.read_config(path)
    except (ValueError, OSError) as e:
        return _error(str(e), 1)
    n_params = sum(math.prod(s) for s in param_shapes(config).values())
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    print(f"path: {path}")
    print(f"parameters: {n_params:,} ({n_params / 1e9:.2f} B)")
    print(f"dtype: {orbax_io.stored_dtype(path)}")
    quantized = orbax_io.read_quantized(path)
    if quantized:
        kinds = sorted({(q.format, q.group_size, q.has_mins) for q in quantized.values()}, key=str)
        print("quantized: " + ", ".join(f"{f}" + (f" (groups of {g}{', with minimums' if m else ''})" if g else
                                                   " (per channel)") for f, g, m in kinds)
              + f": {len(quantized)} of {len(param_shapes(config))} weights")
    print(f"backend: {ops.describe(RuntimeConfig().resolved())} (on this machine, by default)")
    print(f"size on disk: {size / 1e6:.1f} MB")
    print("config: " + json.dumps(config.to_dict(), indent=2))
    return 0


class _CompileTimer:
    """Seconds JAX spent tracing, lowering and compiling, from its monitoring events, so that the
    timings of a first call can say how much of them was compilation."""

    def __init__(self):
        from jax import monitoring

        self.total = 0.0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, secs, **_):
        if name.startswith("/jax/core/compile/"):
            self.total += secs


def _generate_record(model, prompt: str, sampling: dict, compiles: _CompileTimer) -> dict:
    """One prompt's completion and timings."""
    compiled = compiles.total
    c = model.generate([prompt], **sampling)[0]
    # Wall-clock seconds; compile_s is the part of them JAX spent compiling (first calls).
    timings = {k: None if v is None else round(v, 4) for k, v in c.timings.items()}
    timings["compile_s"] = round(compiles.total - compiled, 4)
    return {"prompt": prompt, "token_ids": c.token_ids, "text": c.text, "finish_reason": c.finish_reason,
            "prompt_token_ids": c.prompt_token_ids, "timings": timings}


def cmd_generate(args: argparse.Namespace) -> int:
    """llama-jax generate --prompt TEXT [...]: streams each prompt's continuation, or with --json
    prints one JSON object per prompt."""
    model = load_model(args)
    sampling = _sampling(args)
    compiles = _CompileTimer() if args.json else None
    try:
        for i, prompt in enumerate(args.prompt):
            if args.json:
                print(json.dumps(_generate_record(model, prompt, sampling, compiles)), flush=True)
                continue
            if i:
                print()
            # Echo the prompt, so that the output reads as the text the model continued.
            print(prompt, end="", flush=True)
            for piece in model.stream(prompt, **sampling):
                print(piece, end="", flush=True)
            print(flush=True)
    except ValueError as e:  # a prompt too long for the context, or a model without a tokenizer
        raise CliError(first_line(e), 2) from None
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """llama-jax chat: a streaming multi-turn chat on stdin/stdout; /reset clears the history,
    /exit or end of input (Ctrl-D) quits. With stdin not a terminal (a pipe), each line is one user
    turn, echoed to stderr, so that stdout holds only the replies."""
    model = load_model(args)
    try:
        model.chat_prompt([{"role": "user", "content": "hi"}])
    except ValueError as e:  # a base model: no chat template
        raise CliError(f"{first_line(e)}; use `llama-jax generate`", 2) from None
    sampling = _sampling(args)
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print("chat: /reset clears the history, /exit or Ctrl-D quits", file=sys.stderr)
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    while True:
        try:
            line = input("> ") if interactive else sys.stdin.readline()
        except EOFError:
            line = ""
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a fresh line, not an exit
            print(file=sys.stderr)
            continue
        if not line:  # end of input
            if interactive:
                print(file=sys.stderr)
            break
        line = line.strip()
        if not interactive and line:
            print(f"> {line}", file=sys.stderr, flush=True)
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = list(start)
            print("(history cleared)", file=sys.stderr, flush=True)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]}: /reset or /exit", file=sys.stderr, flush=True)
            continue
        history.append({"role": "user", "content": line})
        try:
            if args.json:
                c = model.chat(history, **sampling)
                reply = c.text
                print(json.dumps({"user": line, "reply": reply, "finish_reason": c.finish_reason}), flush=True)
            else:
                reply = ""
                for piece in model.stream(model.chat_prompt(history), **sampling):
                    reply += piece
                    print(piece, end="", flush=True)
                print(flush=True)
        except ValueError as e:  # the history outgrew the context
            history.pop()
            print(f"error: {first_line(e)} (/reset clears the history)", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # Ctrl-C mid-reply: drop the turn, keep chatting
            history.pop()
            print("\n(interrupted)", file=sys.stderr, flush=True)
            continue
        history.append({"role": "assistant", "content": reply})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """llama-jax bench: greedy generation timings (llama_jax.bench.time_generate) as a small table."""
    import jax

    from llama_jax import ops, quant
    from llama_jax.bench import decode_bytes_per_token, read_bandwidth, time_generate

    model = load_model(args)
    r = time_generate(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                      repeats=args.repeats)
    devices = jax.devices()
    print(f"model: {args.model or 'default (SmolLM2-135M-Instruct)'}")
    print(f"dtype: {model.runtime.dtype}, attention: {model.runtime.attention_impl}, "
          f"device: {devices[0].platform} ({devices[0].device_kind})")
    print(f"backend: {ops.describe(model.runtime)}")
    print(f"weights: {quant.describe(model.state)}")
    print(f"medians of {args.repeats} runs after one warm-up run (which includes compilation)")
    header = ("prompt tokens", "new tokens", "batch", "warmup s", "prefill s", "decode tok/s")
    row = (str(args.prompt_len), str(args.new_tokens), str(args.batch), f"{r['warmup_s']:.2f}",
           f"{r['prefill_s']:.4f}", f"{r['decode_tok_s']:.1f}")
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    spec = r["speculative"]
    if spec is not None:
        rate = "-" if spec["acceptance_rate"] is None else f"{spec['acceptance_rate']:.2f}"
        per = "-" if spec["accepted_per_step"] is None else f"{spec['accepted_per_step']:.2f}"
        note = "; random prompts rarely repeat" if model.speculative.method == "ngram" else ""
        print(f"speculative {model.speculative.method}, K={model.speculative.num_speculative_tokens}: "
              f"{spec['accepted_tokens']} of {spec['proposed_tokens']} proposed tokens kept (acceptance {rate}, "
              f"{per} per verify{note})")
    # The decode bound, measured in the same run: a step reads every weight once.
    bandwidth = read_bandwidth()
    per_token = decode_bytes_per_token(model, args.prompt_len + args.new_tokens)
    bound = bandwidth / per_token
    print(f"memory bound: {bandwidth / 1e9:.1f} GB/s read (a jitted f32 matrix-vector product over 512 MB), "
          f"{per_token / 1e6:.0f} MB per token -> {bound:.1f} tok/s; decode reaches "
          f"{args.batch * r['decode_tok_s'] / bound:.2f} of it")
    return 0


# --- serve --------------------------------------------------------------------------------------


def _add_serve_command(sub) -> None:
    from llama_jax.engine import DEFAULT_DECODE_STEPS

    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                        description="Serves POST /v1/chat/completions and /v1/completions (streaming or not), "
                                    "GET /v1/models, /health and /metrics. Without --model: the default model.")
    _add_model_args(sv)
    _add_speculative_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=checked(int, lambda n: 0 <= n < 65536, "a port number"), default=8000,
                    help="default 8000")
    sv.add_argument("--max-batch", type=int_at_least(1), default=8, metavar="N",
                    help="the most requests running (decoded together); default 8")
    sv.add_argument("--max-seq-len", type=int_at_least(2), metavar="T",
                    help="the longest request, prompt and completion (default: the model's context, at most 4096)")
    sv.add_argument("--kv-cache-tokens", type=int_at_least(16), metavar="N",
                    help="tokens the paged KV cache holds, all requests together (default: 1 GiB of cache on a "
                         "CPU, 90%% of the memory free after the weights on a GPU; at least --max-seq-len, at "
                         "most --max-batch times it)")
    sv.add_argument("--decode-steps", type=int_at_least(1), default=DEFAULT_DECODE_STEPS, metavar="N",
                    help="decode steps per device call: tokens reach clients N at a time, and a new request "
                         f"waits at most one call to start (default {DEFAULT_DECODE_STEPS})")
    sv.add_argument("--api-key", metavar="KEY",
                    help="require 'Authorization: Bearer KEY' on /v1 and /metrics (default: $LLAMA_JAX_API_KEY, "
                         "which keeps the key out of process listings; none: anyone who reaches the port)")
    sv.add_argument("--max-queue", type=int_at_least(0), default=64, metavar="N",
                    help="requests waiting to start before the server answers 429 (default 64)")
    sv.add_argument("--lora", metavar="NAME=DIR", dest="lora_modules", action="append", type=_lora_module,
                    help="serve a LoRA adapter in PEFT's format as model NAME beside the base (repeat for more): "
                         "a request whose model is NAME runs with it, in the same batches as the others")
    sv.set_defaults(func=cmd_serve)


def _lora_module(text: str) -> tuple[str, str]:
    name, eq, directory = text.partition("=")
    if not eq or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR, got {text!r}")
    return name, directory


API_KEY_ENV = "LLAMA_JAX_API_KEY"


def _loopback(host: str) -> bool:
    """Whether a listening address serves this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    """llama-jax serve: loads the model, compiles the engine's short-request programs, then serves
    until Ctrl-C."""
    import logging
    import time

    import uvicorn

    from llama_jax.engine import Engine, EngineThread
    from llama_jax.server import create_app

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not api_key.strip():
        raise CliError("--api-key: must not be empty", 2)
    name = os.path.basename(os.path.abspath(args.model)) if args.model else "SmolLM2-135M-Instruct"
    names = [n for n, _ in args.lora_modules or ()]
    if len(set(names)) < len(names) or name in names:
        raise CliError(f"--lora: adapter names must differ from each other and from the model's ({name})", 2)
    model = load_model(args)
    try:
        engine = Engine(model, max_batch=args.max_batch, max_seq_len=args.max_seq_len,
                        kv_cache_tokens=args.kv_cache_tokens, decode_steps=args.decode_steps,
                        speculative=model.speculative)
        sched = EngineThread(engine, max_queue=args.max_queue)
    except ValueError as e:
        raise CliError(first_line(e), 2) from None
    # One line per request from the server's logger (the root logger may belong to a library already).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("llama_jax")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    print(f"KV cache: {engine.pool.usable} blocks of {engine.block_size} tokens ({engine.kv_cache_tokens} tokens); "
          f"up to {args.max_batch} requests of up to {engine.max_seq_len} tokens; prefill chunks of {engine.chunk}",
          file=sys.stderr, flush=True)
    t = time.perf_counter()
    compiled = sched.warmup()
    print(f"prepared {compiled['prefill']} prefill and {compiled['decode']} decode programs in "
          f"{time.perf_counter() - t:.1f}s (compiled, or read from JAX's compilation cache; others compile on "
          "first use)", file=sys.stderr, flush=True)
    sched.start()
    print(f"serving {name} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    if api_key is None and not _loopback(args.host):
        print(f"warning: serving on {args.host} without an API key: anyone who can reach port {args.port} can use "
              f"it (--api-key or ${API_KEY_ENV})", file=sys.stderr, flush=True)
    try:
        # uvicorn's access log would repeat the server's own line per request.
        app = create_app(model, engine=sched, model_name=name, api_key=api_key)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    finally:
        sched.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from checkpoints_tools import convert

    p = _Parser(prog="llama-jax", description="Llama 3 in JAX")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("convert", help="convert a Hugging Face directory or a .gguf file to our checkpoint")
    convert.add_arguments(c)
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("inspect", help="describe a converted checkpoint")
    i.add_argument("path", metavar="DIR")
    i.set_defaults(func=cmd_inspect)

    g = sub.add_parser("generate", help="continue prompts, streaming the text")
    _add_model_args(g)
    _add_lora_arg(g)
    g.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="repeat for several prompts")
    _add_sampling_args(g, max_new_tokens=64)
    _add_speculative_args(g)
    g.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: prompt, token_ids, text, finish_reason, timings")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="chat in the terminal (or through a pipe, one line per turn)")
    _add_model_args(ch)
    _add_lora_arg(ch)
    ch.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    _add_sampling_args(ch, max_new_tokens=256)
    _add_speculative_args(ch)
    ch.add_argument("--json", action="store_true", help="one JSON object per turn: user, reply, finish_reason")
    ch.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="time prefill and decode (greedy, random prompt tokens)")
    _add_model_args(b)
    b.add_argument("--prompt-len", type=checked(int, lambda n: n >= 1, ">= 1"), default=16, metavar="N")
    b.add_argument("--new-tokens", type=checked(int, lambda n: n >= 2, ">= 2"), default=64, metavar="N")
    b.add_argument("--batch", type=checked(int, lambda n: n >= 1, ">= 1"), default=1, metavar="B")
    b.add_argument("--repeats", type=checked(int, lambda n: n >= 1, ">= 1"), default=3, metavar="R")
    _add_speculative_args(b)
    b.set_defaults(func=cmd_bench)

    from llama_jax.eval import add_eval_command
    from llama_jax.train.command import add_train_command

    add_eval_command(sub)
    add_train_command(sub)
    _add_serve_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llama-jax` script; returns (and, as a script, exits with) the exit code."""
    args = build_parser().parse_args(argv)  # argparse exits with 2 on usage errors
    try:
        return args.func(args)
    except CliError as e:
        return _error(str(e), e.code)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `llama-jax generate ... | head`: the reader left; not our failure
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
