"""`llama-jax train`: its arguments and the run (llama_jax.cli dispatches to it)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from llama_jax.cli import (ATTENTION_IMPLS, CPU_KERNELS, CPU_KERNELS_HELP, CliError, checked, first_line, int_at_least,
                           load_model, model_path, parse_mesh)


def add_train_command(sub) -> None:
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
    t.add_argument("--steps", type=int_at_least(1), default=100, metavar="N", help="optimizer steps (default 100)")
    t.add_argument("--seq-len", type=int_at_least(2), default=128, metavar="T", help="tokens per row (default 128)")
    t.add_argument("--batch-size", type=int_at_least(1), default=4, metavar="B", help="rows per micro-batch (default 4)")
    t.add_argument("--grad-accum", type=int_at_least(1), default=1, metavar="K",
                   help="micro-batches per step (default 1); a step sees B * K rows")
    t.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    t.add_argument("--warmup", type=checked(int, lambda n: n >= 0, ">= 0"), metavar="N",
                   help="warmup steps (default: a tenth of --steps)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, metavar="R", help="final lr / peak lr (default 0.1)")
    t.add_argument("--weight-decay", type=float, default=0.1, metavar="W", help="default 0.1")
    t.add_argument("--grad-clip", type=float, default=1.0, metavar="C", help="global-norm clip (default 1.0; 0: off)")
    t.add_argument("--remat", default="none", choices=("none", "full", *REMAT_POLICIES),
                   help="recompute each layer in the backward: none (default), full, or a jax.checkpoint policy")
    t.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute dtype (weights and optimizer stay float32); default: float32 on CPU, bfloat16 on GPU")
    t.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default="auto")
    t.add_argument("--cpu-kernels", choices=CPU_KERNELS, default="auto", help=CPU_KERNELS_HELP)
    t.add_argument("--mesh", metavar="SPEC", help="train over devices, e.g. fsdp=4,tp=2 or pp=2,dp=4: sizes of dp "
                   "(data), fsdp (data, with weights and optimizer state split), cp (context: the sequence split), "
                   "pp (pipeline stages), tp (tensor); tp defaults to the devices left over (docs/SHARDING.md)")
    t.add_argument("--micro-batches", type=int_at_least(1), metavar="M",
                   help="pipeline micro-batches per --batch-size rows (with pp > 1; default: the smallest divisor "
                        "of B that is >= 2 x pp and whose micro-batches dp divides)")
    t.add_argument("--lora-rank", type=int_at_least(1), metavar="R",
                   help="train low-rank adapters of rank R (LoRA) with the model frozen, instead of every weight")
    t.add_argument("--lora-alpha", type=float, metavar="A", help="adapter scale A / R (default A = 2 x R)")
    t.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                   help="dropout on each adapter's input while training (default 0)")
    t.add_argument("--lora-targets", metavar="LIST",
                   help="the projections that get adapters, from q,k,v,o,gate,up,down (default: all of them)")
    t.add_argument("--quantize", choices=("int8", "int4", "fp8"),
                   help="with --lora-rank: QLoRA, the frozen model quantized at load (weight-only; the embedding and "
                        "head at 8 bits)")
    t.add_argument("--seed", type=int, default=0, help="data order, adapter init and dropout (default 0)")
    t.add_argument("--eval-every", type=checked(int, lambda n: n >= 0, ">= 0"), metavar="N",
                   help="held-out loss every N steps (default: a fifth of --steps; 0: only at the end)")
    t.add_argument("--eval-rows", type=int_at_least(1), default=32, metavar="N", help="held-out rows evaluated (default 32)")
    t.add_argument("--eval-fraction", type=checked(float, lambda f: 0 < f < 1, "in (0, 1)"), default=0.05,
                   metavar="F", help="share of the corpus held out (default 0.05)")
    t.add_argument("--save-every", type=checked(int, lambda n: n >= 0, ">= 0"), metavar="N",
                   help="checkpoint every N steps (default: a quarter of --steps; always at the end)")
    t.add_argument("--keep", type=int_at_least(1), default=2, metavar="N", help="checkpoints kept (default 2)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--stop-after", type=int_at_least(1), metavar="N",
                   help="stop after N steps of this invocation, with a checkpoint (continue with --resume)")
    t.add_argument("--export", choices=tuple(EXPORT_DIRS) + ("both", "none"),
                   help="what to write at the end. Full fine-tuning: hf (OUT/hf, transformers' format, the default), "
                        "ours (OUT/model, the converted format) or both; LoRA: peft (OUT/adapter, PEFT's adapter "
                        "format, the default), merged (OUT/merged, the model with the adapter merged in, "
                        "transformers' format) or both; none")
    t.set_defaults(func=cmd_train)


# Export format -> the run directory's subdirectory it goes in.
EXPORT_DIRS = {"hf": "hf", "ours": "model", "peft": "adapter", "merged": "merged"}


def _exports(args) -> list[str]:
    """The formats --export names for this run (full fine-tuning or LoRA); CliError for one that does
    not fit the run."""
    lora = args.lora_rank is not None
    formats = ["peft", "merged"] if lora else ["hf", "ours"]
    choice = args.export or formats[0]
    if choice in ("both", "none"):
        return formats if choice == "both" else []
    if choice not in formats:
        run = "a LoRA run (--lora-rank)" if lora else "full fine-tuning (no --lora-rank)"
        raise CliError(f"--export {choice}: {run} exports {formats[0]}, {formats[1]}, both or none", 2)
    return [choice]


def _out_dir(args) -> str:
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
    from llama_jax.paths import cache_dir
    from llama_jax.train import TrainConfig, Trainer, TrainingDiverged, fit

    steps = args.steps
    lora = {}
    if args.lora_rank is not None:
        lora = dict(lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout)
        if args.lora_targets is not None:
            lora["lora_targets"] = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    elif args.lora_alpha is not None or args.lora_dropout or args.lora_targets is not None or args.quantize:
        raise CliError("--lora-alpha, --lora-dropout, --lora-targets and --quantize need --lora-rank", 2)
    try:
        config = TrainConfig(
            peak_lr=args.lr, warmup_steps=steps // 10 if args.warmup is None else args.warmup, total_steps=steps,
            min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
            grad_clip=args.grad_clip if args.grad_clip > 0 else None, grad_accum=args.grad_accum,
            remat={"none": False, "full": True}.get(args.remat, args.remat), compute_dtype=args.dtype,
            seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, micro_batches=args.micro_batches,
            **lora)
    except ValueError as e:
        raise CliError(re.sub(r"\blora_(\w+)", lambda m: "--lora-" + m[1], str(e).replace("TrainConfig: ", ""))
                       .replace("peak_lr", "--lr").replace("warmup_steps", "--warmup").replace("total_steps", "--steps"),
                       2) from None
    exports = _exports(args)
    out = _out_dir(args)
    # Full fine-tuning keeps float32 master weights; LoRA reads the frozen model in the compute dtype.
    load_args = argparse.Namespace(**{**vars(args), "dtype": args.dtype if lora else "float32"})
    model = load_model(load_args, mesh=parse_mesh(args.mesh))
    model_dir = model_path(args)
    if args.seq_len > model.config.max_seq_len:
        raise CliError(f"--seq-len {args.seq_len} is past the model's context ({model.config.max_seq_len} tokens)", 2)
    if model.tokenizer is None:
        raise CliError(f"{model_dir}: the model has no tokenizer, so text cannot be tokenized for it", 2)

    ckpt_dir = os.path.join(out, "checkpoints")
    try:
        trainer = Trainer(model, config, resume_from=ckpt_dir if args.resume else None, keep_checkpoints=args.keep)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(first_line(e), 2) from None

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
    what = {"hf": "Hugging Face safetensors", "ours": "the converted format", "peft": "the adapter (PEFT's format)",
            "merged": "the merged model (Hugging Face safetensors)"}
    for fmt in exports:
        where = trainer.export(os.path.join(out, EXPORT_DIRS[fmt]), fmt, overwrite=True, base_model=model_dir,
                               tokenizer_from=None if fmt == "peft" else model_dir)
        log(f"exported {what[fmt]}: {where}")
    summary = {"step": result["step"], "loss": result.get("loss"), "eval_loss": result.get("eval_loss"), "out": out}
    print(json.dumps(summary), flush=True)
    return 0
