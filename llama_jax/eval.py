"""Perplexity over a text corpus (issue #25): the number that says what quantizing costs.

The corpus is one stream of tokens (each text encoded, BOS first where the tokenizer asks for it)
cut into non-overlapping windows of `seq_len` tokens; in each window every token after the first is
predicted from the ones before it in the window. This is what transformers' `model(ids,
labels=ids).loss` computes per window, so the float model's figure can be checked against it. The
loss is the training loss (`train.loss.loss_sums`: the output head applied chunk by chunk, no
[B, T, V] logits), jitted once per (batch, seq_len); the last window may be short and the last batch
may be partial: both are padded with zero-weight tokens (segment id 0), so nothing recompiles.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
from typing import Iterable, Sequence

import jax
import numpy as np

from llama_jax import model as model_lib

DEFAULT_SEQ_LEN = 512


@functools.partial(jax.jit, static_argnums=0)
def _nll_sums(graphdef, state, tokens, segment_ids):
    """(sum of next-token negative log-likelihoods, number of targets), f32, of tokens [B, T]:
    targets where segment_ids [B, T] is nonzero on both sides (padding is segment 0)."""
    from llama_jax.train.loss import loss_sums

    model = model_lib.merge(graphdef, state)
    return loss_sums(model, tokens, segment_ids)


def _token_stream(llm, texts: Iterable[str | Sequence[int]]) -> np.ndarray:
    """All texts as one int32 stream: a string is encoded (BOS first when the tokenizer adds one to
    raw text), a sequence of ints is taken as token ids."""
    parts = []
    for text in texts:
        if isinstance(text, str):
            if llm.tokenizer is None:
                raise ValueError("perplexity of text needs a tokenizer (this model has none); pass token ids")
            tok = llm.tokenizer
            ids = ([tok.bos_id] if tok.add_bos and tok.bos_id is not None else []) + tok.encode(text)
        else:
            ids = list(text)
        parts.append(np.asarray(ids, dtype=np.int64).reshape(-1))
    stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    vocab = llm.config.vocab_size
    if stream.size and (stream.min() < 0 or stream.max() >= vocab):
        bad = stream[(stream < 0) | (stream >= vocab)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
    return stream.astype(np.int32)


def windows(stream: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Non-overlapping windows of seq_len tokens; the last may be shorter, and is dropped when it
    has no target (a single token)."""
    cut = [stream[i:i + seq_len] for i in range(0, len(stream), seq_len)]
    return [w for w in cut if len(w) >= 2]


def perplexity(llm, texts: Iterable[str | Sequence[int]], *, seq_len: int = DEFAULT_SEQ_LEN,
               batch_size: int = 1) -> dict:
    """Token-level perplexity of `llm` (a llama_jax.Llama) over texts (strings, or lists of token
    ids), in non-overlapping windows of seq_len tokens, batch_size windows per call.

    Returns {"perplexity": exp(nll), "nll": mean negative log-likelihood per predicted token (nats),
    "tokens": predicted tokens (each window's first is context only), "windows", "seq_len"}."""
    from llama_jax import sharding

    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if seq_len > llm.config.max_seq_len:
        raise ValueError(f"seq_len {seq_len} is past the model's context ({llm.config.max_seq_len})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sharding.check_batch(llm.mesh, batch_size)
    rows = windows(_token_stream(llm, texts), seq_len)
    if not rows:
        raise ValueError("the corpus has fewer than 2 tokens: nothing to predict")
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        tokens = np.zeros((batch_size, seq_len), np.int32)
        segments = np.zeros((batch_size, seq_len), np.int32)  # 0: padding, no target
        for r, w in enumerate(rows[start:start + batch_size]):
            tokens[r, :len(w)], segments[r, :len(w)] = w, 1
        with sharding.on_mesh(llm.mesh):
            put = lambda a: jax.device_put(a, sharding.batch_sharding(llm.mesh, 2))  # noqa: E731
            nll, n = _nll_sums(llm.graphdef, llm.state, put(tokens), put(segments))
        total += float(nll)  # summed on the host in f64: a corpus has millions of tokens
        count += int(round(float(n)))
    mean = total / count
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": count, "windows": len(rows), "seq_len": seq_len}


# --- llama-jax eval -------------------------------------------------------------------------------


def add_eval_command(sub) -> None:
    """Adds `llama-jax eval` to the command line's subparsers."""
    from llama_jax.cli import _add_model_args, int_at_least

    e = sub.add_parser("eval", help="perplexity of a model over a text file, printed as JSON",
                       description="Token-level perplexity over a UTF-8 text file, in non-overlapping windows of "
                                   "--seq-len tokens (each window's first token is context only).")
    _add_model_args(e)
    e.add_argument("--data", required=True, metavar="PATH", help="a UTF-8 text file")
    e.add_argument("--seq-len", type=int_at_least(2), default=DEFAULT_SEQ_LEN, metavar="T",
                   help=f"tokens per window (default {DEFAULT_SEQ_LEN})")
    e.add_argument("--batch-size", type=int_at_least(1), default=1, metavar="B", help="windows per call (default 1)")
    e.set_defaults(func=cmd_eval)


def _read_corpus(path: str) -> str:
    from llama_jax.cli import CliError, first_line

    if not os.path.exists(path):
        raise CliError(f"{path}: no such file", 2)
    if os.path.isdir(path):
        raise CliError(f"{path}: is a directory, expected a text file", 2)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise CliError(f"{path}: not UTF-8 text (byte {e.start})", 2) from None
    except OSError as e:
        raise CliError(first_line(e), 1) from None
    if not text.strip():
        raise CliError(f"{path}: empty, nothing to measure", 2)
    return text


def cmd_eval(args: argparse.Namespace) -> int:
    """llama-jax eval --model DIR --data PATH [--quantize F] [--seq-len T]: prints one JSON object
    (perplexity, nll, tokens, windows, seq_len, model, data, quantize)."""
    from llama_jax.cli import CliError, load_model

    text = _read_corpus(args.data)  # before loading: a wrong path fails in a moment
    llm = load_model(args)
    if llm.tokenizer is None:
        raise CliError(f"{args.model}: the model directory has no tokenizer; eval needs one to read text", 2)
    try:
        result = perplexity(llm, [text], seq_len=args.seq_len, batch_size=args.batch_size)
    except ValueError as e:
        raise CliError(str(e).splitlines()[0], 2) from None
    result.update(model=args.model, data=args.data, quantize=args.quantize)
    print(json.dumps(result))
    return 0


__all__ = ["perplexity", "windows", "add_eval_command", "cmd_eval"]
