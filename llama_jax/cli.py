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

ATTENTION_IMPLS = ("auto", "xla", "pallas", "cudnn")


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


def _first_line(e: BaseException) -> str:
    msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
    return msg.splitlines()[0] if msg.strip() else type(e).__name__


# --- Shared arguments and loading -----------------------------------------------------------------


def _checked(kind, test, what):
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


def _int_at_least(least: int):
    """An argparse type: an integer >= least."""
    return _checked(int, lambda n: n >= least, f">= {least}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="PATH",
                   help="a model directory (made by `llama-jax convert`, or Hugging Face safetensors); "
                        "default: SmolLM2-135M-Instruct, prepared on first use")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto",
                   help="default auto: pallas on GPU, xla on CPU")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=_checked(int, lambda n: n >= 1, ">= 1"), default=max_new_tokens,
                   metavar="N", help=f"default {max_new_tokens}")
    p.add_argument("--temperature", type=_checked(float, lambda t: t >= 0, ">= 0"), default=0.0, metavar="T",
                   help="0 (the default) is greedy")
    p.add_argument("--top-p", type=_checked(float, lambda p: 0 < p <= 1, "in (0, 1]"), metavar="P")
    p.add_argument("--top-k", type=_checked(int, lambda k: k >= 1, ">= 1"), metavar="K")
    p.add_argument("--seed", type=int, default=0, metavar="S")


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed)


def _model_path(args) -> str:
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

    from llama_jax.default_model import cache_dir

    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.join(cache_dir(), "jax-compile"))


def _parse_mesh(text: str | None):
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


def _load(args, mesh=None):
    """The Llama that --model, --dtype and --attention-impl name (on `mesh`); raises CliError."""
    import llama_jax
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.gguf_io import GGUFError
    from llama_jax.safetensors_io import SafetensorsError

    path = _model_path(args)
    _cache_compiled_programs()
    try:
        return llama_jax.load(path, dtype=args.dtype, attention_impl=args.attention_impl, mesh=mesh)
    except FileNotFoundError as e:  # a directory that holds no model
        raise CliError(_first_line(e), 2) from None
    except (CheckpointError, GGUFError, SafetensorsError, OSError) as e:
        raise CliError(_first_line(e), 1) from None
    except ValueError as e:  # a setting that does not fit, e.g. cudnn on a CPU
        raise CliError(_first_line(e), 2) from None


# --- Subcommands ----------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    """llama-jax convert SRC DST [--dtype] [--force] [--allow-extra]"""
    # The command line and default_model reach up into checkpoints_tools; the library proper never does.
    from checkpoints_tools import convert

    return convert.run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    """llama-jax inspect DIR: the config, parameter count, stored dtype and size on disk."""
    import math

    from llama_jax import orbax_io
    from llama_jax.checkpoint import param_shapes

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
    print(f"dtype: {config.param_dtype}")
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
    model = _load(args)
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
        raise CliError(_first_line(e), 2) from None
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """llama-jax chat: a streaming multi-turn chat on stdin/stdout; /reset clears the history,
    /exit or end of input (Ctrl-D) quits. With stdin not a terminal (a pipe), each line is one user
    turn, echoed to stderr, so that stdout holds only the replies."""
    model = _load(args)
    try:
        model.chat_prompt([{"role": "user", "content": "hi"}])
    except ValueError as e:  # a base model: no chat template
        raise CliError(f"{_first_line(e)}; use `llama-jax generate`", 2) from None
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
            print(f"error: {_first_line(e)} (/reset clears the history)", file=sys.stderr, flush=True)
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

    from llama_jax.bench import decode_bytes_per_token, read_bandwidth, time_generate

    model = _load(args)
    r = time_generate(model, prompt_len=args.prompt_len, new_tokens=args.new_tokens, batch=args.batch,
                      repeats=args.repeats)
    devices = jax.devices()
    print(f"model: {args.model or 'default (SmolLM2-135M-Instruct)'}")
    print(f"dtype: {model.config.dtype}, attention: {model.config.attention_impl}, "
          f"device: {devices[0].platform} ({devices[0].device_kind})")
    print(f"medians of {args.repeats} runs after one warm-up run (which includes compilation)")
    header = ("prompt tokens", "new tokens", "batch", "warmup s", "prefill s", "decode tok/s")
    row = (str(args.prompt_len), str(args.new_tokens), str(args.batch), f"{r['warmup_s']:.2f}",
           f"{r['prefill_s']:.4f}", f"{r['decode_tok_s']:.1f}")
    widths = [max(len(h), len(v)) for h, v in zip(header, row)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    # The decode bound, measured in the same run: a step reads every weight once.
    bandwidth = read_bandwidth()
    per_token = decode_bytes_per_token(model, args.prompt_len + args.new_tokens)
    bound = bandwidth / per_token
    print(f"memory bound: {bandwidth / 1e9:.1f} GB/s read (a jitted f32 matrix-vector product over 512 MB), "
          f"{per_token / 1e6:.0f} MB per token -> {bound:.1f} tok/s; decode reaches "
          f"{args.batch * r['decode_tok_s'] / bound:.2f} of it")
    return 0


# --- train --------------------------------------------------------------------------------------


def _add_train_command(sub) -> None:
    from llama_jax.train import REMAT_POLICIES

    t = sub.add_parser("train", help="fine-tune a model on text (packed documents, AdamW, warmup-cosine)",
                       description="Fine-tunes a model on a text corpus and exports it. Without flags: the default "
                                   "model on the Python documentation (pydoc_data.topics), 100 steps.")
    t.add_argument("--model", metavar="PATH", help="a model directory (converted or Hugging Face); default: "
                   "SmolLM2-135M-Instruct, prepared on first use")
    t.add_argument("--data", metavar="PATH", help="a .txt/.md/.rst file (one document), a .jsonl file (one document "
                   "per line's 'text'), or a directory of them; default: pydoc_data.topics, the Python docs")
    t.add_argument("--out", metavar="DIR", help="the run directory: checkpoints/, metrics.jsonl, hf/ (the exported "
                   "model); must be new or empty, or an earlier run with --resume; default: ./llama-jax-runs/<time>")
    t.add_argument("--steps", type=_int_at_least(1), default=100, metavar="N", help="optimizer steps (default 100)")
    t.add_argument("--seq-len", type=_int_at_least(2), default=128, metavar="T", help="tokens per row (default 128)")
    t.add_argument("--batch-size", type=_int_at_least(1), default=4, metavar="B", help="rows per micro-batch (default 4)")
    t.add_argument("--grad-accum", type=_int_at_least(1), default=1, metavar="K",
                   help="micro-batches per step (default 1); a step sees B * K rows")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    t.add_argument("--warmup", type=_checked(int, lambda n: n >= 0, ">= 0"), metavar="N",
                   help="warmup steps (default: a tenth of --steps)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="final lr / peak lr (default 0.1)")
    t.add_argument("--weight-decay", type=float, default=0.1, metavar="W", help="default 0.1")
    t.add_argument("--grad-clip", type=float, default=1.0, metavar="C", help="global-norm clip (default 1.0; 0: off)")
    t.add_argument("--remat", default="none", choices=("none", "full", *REMAT_POLICIES),
                   help="recompute each layer in the backward: none (default), full, or a jax.checkpoint policy")
    t.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (weights and optimizer stay float32); default: float32 on CPU, bfloat16 on GPU")
    t.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto")
    t.add_argument("--mesh", metavar="SPEC", help="train over devices, e.g. fsdp=4,tp=2 or pp=2,dp=4: sizes of dp "
                   "(data), fsdp (data, with weights and optimizer state split), cp (context: the sequence split), "
                   "pp (pipeline stages), tp (tensor); tp defaults to the devices left over (docs/SHARDING.md)")
    t.add_argument("--micro-batches", type=_int_at_least(1), metavar="M",
                   help="pipeline micro-batches per --batch-size rows (with pp > 1; default: the smallest divisor "
                        "of B that is >= 2 x pp and whose micro-batches dp divides)")
    t.add_argument("--seed", type=int, default=0, help="data order (default 0)")
    t.add_argument("--eval-every", type=_checked(int, lambda n: n >= 0, ">= 0"), metavar="N",
                   help="held-out loss every N steps (default: a fifth of --steps; 0: only at the end)")
    t.add_argument("--eval-rows", type=_int_at_least(1), default=32, metavar="N", help="held-out rows evaluated (default 32)")
    t.add_argument("--eval-fraction", type=_checked(float, lambda f: 0 < f < 1, "in (0, 1)"), default=0.05,
                   metavar="F", help="share of the corpus held out (default 0.05)")
    t.add_argument("--save-every", type=_checked(int, lambda n: n >= 0, ">= 0"), metavar="N",
                   help="checkpoint every N steps (default: a quarter of --steps; always at the end)")
    t.add_argument("--keep", type=_int_at_least(1), default=2, metavar="N", help="checkpoints kept (default 2)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--stop-after", type=_int_at_least(1), metavar="N",
                   help="stop after N steps of this invocation, with a checkpoint (continue with --resume)")
    t.add_argument("--export", choices=("hf", "ours", "both", "none"), default="hf",
                   help="what to write at the end: hf (OUT/hf, transformers' format, the default), ours "
                        "(OUT/model, the converted format), both, none")
    t.set_defaults(func=cmd_train)


def _train_out_dir(args) -> str:
    """The run directory --out names, checked before anything is loaded or written."""
    import time

    from llama_jax import orbax_io
    from llama_jax.train import RUN_FILE

    if args.out is None:
        if args.resume:
            raise CliError("--resume needs --out (the run to continue)", 2)
        return os.path.abspath(os.path.join("llama-jax-runs", time.strftime("%Y%m%d-%H%M%S")))
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise CliError(f"{args.out}: exists and is not a directory", 2)
    is_run = os.path.isfile(os.path.join(out, "checkpoints", RUN_FILE))
    if args.resume:
        if not is_run:
            raise CliError(f"{args.out}: no training run to resume (no checkpoints/{RUN_FILE})", 2)
        return out
    if is_run:
        raise CliError(f"{args.out}: already holds a training run; pass --resume to continue it, or choose "
                       "another --out (nothing was written)", 2)
    if os.path.isdir(out) and os.listdir(out):
        what = ("a model checkpoint" if orbax_io.is_converted(out) or os.path.isfile(os.path.join(out, "config.json"))
                else "files")
        raise CliError(f"{args.out}: holds {what} and is not a training run; choose a new or empty --out "
                       "(nothing was written)", 2)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    """llama-jax train: fine-tunes --model on --data, checkpointing into --out and exporting at the end."""
    from llama_jax import data as data_lib
    from llama_jax.default_model import cache_dir
    from llama_jax.train import TrainConfig, Trainer, TrainingDiverged, fit

    steps = args.steps
    try:
        config = TrainConfig(
            peak_lr=args.lr, warmup_steps=steps // 10 if args.warmup is None else args.warmup, total_steps=steps,
            min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip if args.grad_clip > 0 else None, grad_accum=args.grad_accum,
            remat={"none": False, "full": True}.get(args.remat, args.remat), compute_dtype=args.dtype,
            seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, micro_batches=args.micro_batches)
    except ValueError as e:
        raise CliError(str(e).replace("TrainConfig: ", "").replace("peak_lr", "--lr")
                       .replace("warmup_steps", "--warmup").replace("total_steps", "--steps"), 2) from None
    out = _train_out_dir(args)
    load_args = argparse.Namespace(**{**vars(args), "dtype": "float32"})  # float32 master weights
    model = _load(load_args, mesh=_parse_mesh(args.mesh))
    model_path = _model_path(args)
    if args.seq_len > model.config.max_seq_len:
        raise CliError(f"--seq-len {args.seq_len} is past the model's context ({model.config.max_seq_len} tokens)", 2)
    if model.tokenizer is None:
        raise CliError(f"{model_path}: the model has no tokenizer, so text cannot be tokenized for it", 2)

    ckpt_dir = os.path.join(out, "checkpoints")
    try:
        trainer = Trainer(model, config, resume_from=ckpt_dir if args.resume else None, keep_checkpoints=args.keep)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(_first_line(e), 2) from None

    tokenizer = model.tokenizer
    del model  # the trainer holds its own float32 copy

    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        tokens = data_lib.tokenize_corpus(args.data, tokenizer, os.path.join(cache_dir(), "tokens"),
                                          eval_fraction=args.eval_fraction)
    except data_lib.DataError as e:
        raise CliError(str(e), 2) from None
    pad = tokenizer.eos_ids[0] if tokenizer.eos_ids else 0
    train_rows = tokens.split("train", args.seq_len, pad_id=pad)
    eval_rows = tokens.split("eval", args.seq_len, pad_id=pad)
    if len(train_rows) == 0:
        raise CliError("empty corpus: no training rows", 2)
    eval_data = data_lib.eval_batches(eval_rows, args.batch_size, max_rows=args.eval_rows)
    mine = slice(*trainer.process_rows(args.batch_size))  # each process evaluates its own rows
    eval_data = [{k: v[mine] for k, v in batch.items()} for batch in eval_data]
    source = args.data or "pydoc_data.topics"
    log(f"data: {source}: {len(tokens.tokens):,} tokens, {tokens.meta['n_docs']} documents; "
        f"{len(train_rows)} training rows of {args.seq_len}, {min(len(eval_rows), args.eval_rows)} held-out rows")

    position = (trainer.data_state or {}).get("position", 0)
    rows_per_step = args.batch_size * args.grad_accum
    batches = data_lib.Batches(train_rows, rows_per_step, seed=args.seed, position=position,
                               part=trainer.process_rows(rows_per_step))
    os.makedirs(out, exist_ok=True)
    if args.resume:
        log(f"resuming {out} at step {trainer.step_count}/{steps}")
    elif eval_data:
        log(f"eval loss before training: {trainer.evaluate(eval_data):.4f}")
    try:
        result = fit(trainer, batches, checkpoint_dir=ckpt_dir, eval_data=eval_data,
                     eval_every=max(1, steps // 5) if args.eval_every is None else args.eval_every,
                     save_every=max(1, steps // 4) if args.save_every is None else args.save_every,
                     stop_after=args.stop_after, metrics_path=os.path.join(out, "metrics.jsonl"), log=log)
    except TrainingDiverged as e:
        raise CliError(f"{e}; the checkpoints in {ckpt_dir} are from before it", 1) from None
    if trainer.step_count < steps:
        log(f"stopped at step {trainer.step_count}/{steps}; continue with: llama-jax train --out {out} --resume "
            "(and the same settings)")
        return 0
    exports = {"hf": ["hf"], "ours": ["ours"], "both": ["hf", "ours"], "none": []}[args.export]
    for fmt in exports:
        where = trainer.export(os.path.join(out, "hf" if fmt == "hf" else "model"), fmt, tokenizer_from=model_path,
                               overwrite=True)
        log(f"exported {'Hugging Face safetensors' if fmt == 'hf' else 'the converted format'}: {where}")
    summary = {"step": result["step"], "loss": result.get("loss"), "eval_loss": result.get("eval_loss"), "out": out}
    print(json.dumps(summary), flush=True)
    return 0


# --- serve --------------------------------------------------------------------------------------


def _add_serve_command(sub) -> None:
    sv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching",
                        description="Serves POST /v1/chat/completions and /v1/completions (streaming or not), "
                                    "GET /v1/models, /health and /metrics. Without --model: the default model.")
    _add_model_args(sv)
    sv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    sv.add_argument("--port", type=_checked(int, lambda n: 0 <= n < 65536, "a port number"), default=8000,
                    help="default 8000")
    sv.add_argument("--max-batch", type=_int_at_least(1), default=8, metavar="N",
                    help="requests decoded together (slots of the KV cache); default 8")
    sv.add_argument("--max-seq-len", type=_int_at_least(2), metavar="T",
                    help="context per request, prompt and completion (default: the model's, at most 4096)")
    sv.add_argument("--max-queue", type=_int_at_least(0), default=64, metavar="N",
                    help="requests waiting for a slot before the server answers 429 (default 64)")
    sv.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """llama-jax serve: loads the model, compiles the scheduler's programs, then serves until Ctrl-C."""
    import logging

    import uvicorn

    from llama_jax.scheduler import Scheduler
    from llama_jax.server import create_app

    model = _load(args)
    name = os.path.basename(os.path.abspath(args.model)) if args.model else "SmolLM2-135M-Instruct"
    try:
        sched = Scheduler(model, max_batch=args.max_batch, max_seq_len=args.max_seq_len, max_queue=args.max_queue)
    except ValueError as e:
        raise CliError(_first_line(e), 2) from None
    # One line per request from the server's logger (the root logger may belong to a library already).
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("llama_jax")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    logger.propagate = False
    print(f"compiling ({args.max_batch} slots of {sched.max_seq_len} tokens, prefill chunks of {sched.chunk})...",
          file=sys.stderr, flush=True)
    sched.warmup()
    sched.start()
    print(f"serving {name} at http://{args.host}:{args.port}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        # uvicorn's access log would repeat the server's own line per request.
        uvicorn.run(create_app(model, scheduler=sched, model_name=name), host=args.host, port=args.port,
                    log_level="warning", access_log=False)
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
    g.add_argument("--prompt", action="append", required=True, metavar="TEXT", help="repeat for several prompts")
    _add_sampling_args(g, max_new_tokens=64)
    g.add_argument("--json", action="store_true",
                   help="one JSON object per prompt: prompt, token_ids, text, finish_reason, timings")
    g.set_defaults(func=cmd_generate)

    ch = sub.add_parser("chat", help="chat in the terminal (or through a pipe, one line per turn)")
    _add_model_args(ch)
    ch.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    _add_sampling_args(ch, max_new_tokens=256)
    ch.add_argument("--json", action="store_true", help="one JSON object per turn: user, reply, finish_reason")
    ch.set_defaults(func=cmd_chat)

    b = sub.add_parser("bench", help="time prefill and decode (greedy, random prompt tokens)")
    _add_model_args(b)
    b.add_argument("--prompt-len", type=_checked(int, lambda n: n >= 1, ">= 1"), default=16, metavar="N")
    b.add_argument("--new-tokens", type=_checked(int, lambda n: n >= 2, ">= 2"), default=64, metavar="N")
    b.add_argument("--batch", type=_checked(int, lambda n: n >= 1, ">= 1"), default=1, metavar="B")
    b.add_argument("--repeats", type=_checked(int, lambda n: n >= 1, ">= 1"), default=3, metavar="R")
    b.set_defaults(func=cmd_bench)

    _add_train_command(sub)
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
