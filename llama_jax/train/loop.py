"""`fit`: the loop `llama-jax train` runs (steps, evaluation, checkpoints, metrics, Ctrl-C)."""

from __future__ import annotations

import json
import os
import sys
import time

from llama_jax.train.trainer import Trainer

def fit(trainer: Trainer, batches, *, checkpoint_dir: str | os.PathLike, eval_data: list[dict] | None = None,
        eval_every: int = 0, save_every: int = 0, stop_after: int | None = None, metrics_path: str | None = None,
        progress: bool = True, log=None) -> dict:
    """Runs `trainer` to config.total_steps on `batches` (a llama_jax.data.Batches, whose position
    goes into each checkpoint), evaluating on `eval_data` every `eval_every` steps and at the end,
    checkpointing into `checkpoint_dir` every `save_every` steps, at the end, after `stop_after` steps
    of this call, and on Ctrl-C. Appends one JSON line per step and per evaluation to `metrics_path`;
    `log(text)` gets a line now and then when there is no progress bar. Returns the last metrics and
    eval loss. A diverged step raises TrainingDiverged with the checkpoints left as they were."""
    from tqdm import tqdm

    total = trainer.config.total_steps
    start = trainer.step_count
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    every = max(1, (total - start) // 20)
    metrics_file = open(metrics_path, "a") if metrics_path else None
    last, eval_loss, saved = {}, None, start

    def record(obj):
        if metrics_file:
            metrics_file.write(json.dumps(obj) + "\n")
            metrics_file.flush()

    def save():
        nonlocal saved
        if saved != trainer.step_count:
            trainer.save(checkpoint_dir, data_state=batches.state())
            saved = trainer.step_count

    try:
        while trainer.step_count < total and (stop_after is None or trainer.step_count - start < stop_after):
            last = trainer.step(next(batches))
            record({**last, "epoch": round(batches.epoch, 4), "time": time.time()})
            bar.update(1)
            bar.set_postfix_str(f"loss {last['loss']:.4f}  lr {last['lr']:.2e}  {last['tokens_per_s']:.0f} tok/s")
            step = trainer.step_count
            if bar.disable and log and (step % every == 0 or step == total):
                log(f"step {step}/{total}: loss {last['loss']:.4f}, lr {last['lr']:.2e}, "
                    f"{last['tokens_per_s']:.0f} tokens/s")
            if eval_data and ((eval_every and step % eval_every == 0) or step == total):
                eval_loss = trainer.evaluate(eval_data)
                record({"step": step, "eval_loss": eval_loss, "time": time.time()})
                if log:
                    (bar.write if not bar.disable else log)(f"step {step}: eval loss {eval_loss:.4f}")
            if (save_every and step % save_every == 0) or step == total:
                save()
        save()  # stop_after
    except KeyboardInterrupt:
        save()  # the last complete step, so --resume continues from here
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {**last, "eval_loss": eval_loss, "step": trainer.step_count}

