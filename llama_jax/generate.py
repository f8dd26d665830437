"""Batch generation over a contiguous KV cache: a jitted prefill, then decode chunks that run on the
device in a `lax.while_loop`. `Llama.generate` runs llama_jax.engine (a paged cache) everywhere
except on a mesh that splits rows or the sequence (data or context parallel), where a pool shared
by every row cannot be split; there it runs this.

Prompts are right-padded to a length bucket (powers of two) in a fixed-shape KV cache, each sequence
with its own length, positions 0..n-1 and stop. Python only drives the loop between chunks, so it
can stream while the device does the per-token work. Everything here is a function of the model's
(graphdef, state), its mesh and the inputs. `Completion` and `collect` serve both paths.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model as model_lib
from llama_jax import sharding
from llama_jax.requests import SamplingParams
from llama_jax.runner import Sampling
from llama_jax.sampling import sample
from llama_jax.scheduler import bucket
from llama_jax.sharding import replicated

CHUNK = 32  # decode steps per device loop; Python sees tokens once per chunk


@dataclasses.dataclass
class Completion:
    """One generated sequence: `token_ids` (generated ids only), `text`, `finish_reason` ("stop"
    when a stop token was produced, which is kept in token_ids but not in text; "length" at
    max_new_tokens), `prompt_token_ids`, and `timings` of the batch it was generated in (seconds
    to the first token and in all, decode tokens/s per sequence; compilation included)."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)
    timings: dict = dataclasses.field(default_factory=dict)


# --- The jitted pieces ----------------------------------------------------------------------------


def sampling_rows(params: SamplingParams, batch: int) -> Sampling:
    """Every row with the request's parameters (and seed: a prompt samples the same tokens alone
    or in any batch)."""
    full = lambda value, dtype: np.full((batch,), value, dtype)  # noqa: E731
    return Sampling(full(params.seed % 2**32, np.uint32), full(params.temperature, np.float32),
                    full(1.0 if params.top_p is None else params.top_p, np.float32), full(params.top_k or 0, np.int32))


class DecodeState(NamedTuple):
    cache: object  # the model's KV cache
    token: jax.Array  # [B] int32: the last token, fed to the next step
    pos: jax.Array  # [B] int32: where `token` goes in the cache
    n_generated: jax.Array  # [B] int32
    done: jax.Array  # [B] bool


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2, 6))
def prefill_chunk(graphdef, state, cache, tokens, start, lengths, last):
    """One chunk of a chunked prefill: tokens [B, C] at positions start..start+C-1 (start a traced
    int32 scalar, so every chunk of a prompt runs the same program) write their keys and values
    into the cache and attend to everything before them. last [B, D]: each row's final hidden
    state at its last prompt token (position lengths - 1), taken from this chunk where it falls in
    it. Returns (cache, last)."""
    b, c = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    x, cache = model_lib.merge(graphdef, state).hidden(tokens, positions, cache=cache)  # (B, C, D)
    i = lengths - 1 - start  # (B,): each row's last prompt token, within this chunk
    x_last = jnp.take_along_axis(x, jnp.clip(i, 0, c - 1)[:, None, None], axis=1)[:, 0]  # (B, D)
    return cache, jnp.where(((i >= 0) & (i < c))[:, None], x_last, last)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def first_token(graphdef, state, cache, last, lengths, sampling: Sampling, stop_ids, max_new_tokens):
    """Samples each sequence's first token from the hidden states `last` [B, D] of its last prompt
    token; returns the DecodeState that decode_chunk continues from."""
    logits = model_lib.merge(graphdef, state).head(last)  # (B, V)
    token = sample(logits, sampling.seed, jnp.zeros_like(lengths), sampling.temperature, sampling.top_p,
                   sampling.top_k)
    n = jnp.ones_like(lengths)
    done = jnp.isin(token, stop_ids) | (n >= max_new_tokens)
    # Replicated, so that every process of a multi-host mesh can read what Python needs.
    return DecodeState(cache, replicated(token), lengths, n, replicated(done))


def prefill(graphdef, state, cache, prompts: Sequence[Sequence[int]], chunk: int, mesh=None):
    """Writes the prompts into the cache chunk by chunk (right-padded, chunks of `chunk` tokens)
    and returns (cache, last hidden state [B, D] of each prompt, lengths [B] on the device).
    Activation memory is bounded by the chunk, not by the prompt."""
    b = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    n_chunks = -(-int(lengths.max()) // chunk)
    cache_len = jax.tree.leaves(cache)[0].shape[-3]  # [..., S, K, E]
    if n_chunks * chunk > cache_len:  # a chunk's write would be clamped into the wrong place
        raise ValueError(f"{n_chunks} chunks of {chunk} tokens do not fit a cache of {cache_len}")
    tokens = np.zeros((b, n_chunks * chunk), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    model = model_lib.merge(graphdef, state)
    rows = sharding.batch_sharding(mesh, 2)
    lengths = jax.device_put(lengths, sharding.batch_sharding(mesh, 1))
    last = jax.device_put(np.zeros((b, model.config.dim), jnp.dtype(model.runtime.dtype)), rows)
    for c in range(n_chunks):
        part = jax.device_put(tokens[:, c * chunk:(c + 1) * chunk], rows)
        cache, last = prefill_chunk(graphdef, state, cache, part, jnp.int32(c * chunk), lengths, last)
    return cache, last, lengths


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(2,))
def decode_chunk(graphdef, state, ds: DecodeState, sampling: Sampling, stop_ids, max_new_tokens):
    """Up to CHUNK decode steps on the device, stopping early once every sequence is done.
    Returns (DecodeState, tokens [B, CHUNK] with -1 where nothing was produced)."""
    model = model_lib.merge(graphdef, state)
    b = ds.token.shape[0]
    out = jnp.full((b, CHUNK), -1, jnp.int32)

    def cond(carry):
        i, ds, _ = carry
        return (i < CHUNK) & ~jnp.all(ds.done)

    def body(carry):
        i, ds, out = carry
        logits, cache = model(ds.token[:, None], ds.pos[:, None], ds.cache)
        token = sample(logits[:, 0], sampling.seed, ds.n_generated, sampling.temperature, sampling.top_p,
                       sampling.top_k)
        live = ~ds.done
        token = jnp.where(live, token, ds.token)
        n = ds.n_generated + live
        done = ds.done | (live & (jnp.isin(token, stop_ids) | (n >= max_new_tokens)))
        out = out.at[:, i].set(jnp.where(live, token, -1))
        return i + 1, DecodeState(cache, token, ds.pos + live, n, done), out

    _, ds, out = jax.lax.while_loop(cond, body, (0, ds, out))
    return ds._replace(done=replicated(ds.done)), replicated(out)


# --- The driver -----------------------------------------------------------------------------------


def init_cache(graphdef, state, batch: int, max_len: int, mesh=None):
    """A zero KV cache for `batch` sequences of up to `max_len` tokens, on the mesh when there is one."""
    return model_lib.merge(graphdef, state).init_cache(batch, max_len, sharding=sharding.placement(mesh))


def plan(longest: int, max_new_tokens: int, prefill_chunk: int, max_seq_len: int) -> tuple[int, int]:
    """(prefill chunk, cache length) for a batch whose longest prompt has `longest` tokens. The
    chunk is prefill_chunk, or the prompt's length bucket when that is shorter; the cache
    holds the chunk-padded prompt and every new token, bucketed too. So compiled programs are
    bounded by the (chunk, cache) bucket pairs. Past the context only padding is ever written."""
    chunk = min(bucket(longest), prefill_chunk)
    padded = -(-longest // chunk) * chunk
    return chunk, max(min(bucket(padded + max_new_tokens), max_seq_len), padded)


def generate_ids(graphdef, state, prompts: Sequence[Sequence[int]], params: SamplingParams, *, mesh=None
                 ) -> Iterator[list[list[int]]]:
    """Yields, chunk by chunk, the new tokens of each prompt (lists, possibly empty per sequence);
    the first chunk holds each sequence's first token. Stop tokens are included. Prompts are
    checked already (llama_jax.requests)."""
    model = model_lib.merge(graphdef, state)
    chunk, s = plan(max(len(p) for p in prompts), params.max_new_tokens, model.runtime.prefill_chunk,
                    model.config.max_seq_len)

    rows = sharding.batch_sharding(mesh, 1)
    sampling = jax.tree.map(lambda a: jax.device_put(a, rows), sampling_rows(params, len(prompts)))
    stop_ids = jnp.asarray(params.stop_token_ids or (-1,), jnp.int32)
    max_new = jnp.int32(params.max_new_tokens)
    with sharding.on_mesh(mesh):
        cache = model.init_cache(len(prompts), s, sharding=sharding.placement(mesh))  # the model merged above
        cache, last, lengths = prefill(graphdef, state, cache, prompts, chunk, mesh)
        ds = first_token(graphdef, state, cache, last, lengths, sampling, stop_ids, max_new)
        first = np.asarray(ds.token)
    yield [[int(x)] for x in first]
    while not bool(np.all(np.asarray(ds.done))):
        with sharding.on_mesh(mesh):
            ds, out = decode_chunk(graphdef, state, ds, sampling, stop_ids, max_new)
            out = np.asarray(out)
        yield [[int(x) for x in row if x >= 0] for row in out]


def collect(chunks: Iterator[list[list[int]]], batch: int) -> tuple[list[list[int]], dict]:
    """Every new token of each of `batch` sequences from a stream of chunks (`generate_ids`'s or
    the engine's), and the batch's timings (seconds to the first token and in all, decode tokens/s
    per sequence; compilation included)."""
    out = [[] for _ in range(batch)]
    t0, ttft = time.perf_counter(), None
    for chunk in chunks:
        if ttft is None and not any(chunk):
            continue
        ttft = time.perf_counter() - t0 if ttft is None else ttft
        for row, new in zip(out, chunk):
            row += new
    total = time.perf_counter() - t0
    steps = max(len(row) for row in out) - 1
    timings = {"time_to_first_token_s": ttft, "total_s": total,
               "decode_tokens_per_s": steps / (total - ttft) if steps > 0 and total > ttft else None}
    return out, timings
