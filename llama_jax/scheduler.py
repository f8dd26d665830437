"""The serving engine: continuous batching over a fixed pool of KV-cache slots. Knows nothing of HTTP.

One thread owns the device. Requests wait in a FIFO queue; each joins the running batch in a free
slot (its own row of a persistent [max_batch, cache_len] KV cache), is prefilled there chunk by
chunk while the other slots keep decoding between its chunks, and leaves the batch as soon as it
finishes or is cancelled. A decode call runs every slot at once, each with its own position and
sampling parameters (arrays, so nothing recompiles per request); a slot that is not decoding writes
at a position no one reads before it is rewritten; a decode call covers only the first power of
two of slots that holds every busy one (on a CPU each row costs compute). Compiled programs: a
decode call per power of two of slots, one first-token sample, two prefills per chunk bucket (16,
32, ... up to the chunk: a prompt's first chunk, and its later ones), whatever arrives.

llama_jax/server.py turns HTTP requests into `Request`s and `Output`s into OpenAI responses, as
vLLM's OpenAI server sits on its engine. The request checks are llama_jax.requests', as for `Llama`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import itertools
import logging
import threading
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import requests, sampling, sharding
from llama_jax.detokenizer import Detokenizer
from llama_jax.metrics import Stats
from llama_jax.generate import bucket, init_cache
from llama_jax.requests import SamplingParams

log = logging.getLogger("llama_jax.scheduler")

MAX_STOP_IDS = 16  # stop token ids per request (eos included): a fixed [B, 16] array on the device
DEFAULT_MAX_SEQ_LEN = 4096  # the server's context when the model's is longer (the cache is per slot)


class QueueFull(Exception):
    """The waiting queue is full; try again later."""


class NotRunning(Exception):
    """The scheduler is stopped (or was never started)."""


# --- The jitted pieces ----------------------------------------------------------------------------


class Slots(NamedTuple):
    """What a decode call needs of each slot, [B] arrays (host numpy, rebuilt by the scheduler)."""

    token: np.ndarray  # int32: the last token, fed to the next step
    pos: np.ndarray  # int32: where `token` goes in the cache
    count: np.ndarray  # int32: tokens generated so far
    max_new: np.ndarray  # int32
    stop_ids: np.ndarray  # int32 [B, MAX_STOP_IDS], padded with -1
    live: np.ndarray  # bool: decoding (else the row computes garbage that nobody reads)
    temperature: np.ndarray  # float32
    top_p: np.ndarray  # float32
    top_k: np.ndarray  # int32, 0: off
    seed: np.ndarray  # uint32


# Traces of each jitted piece so far (every scheduler of this process together): a trace is a new
# program to compile (or to fetch from JAX's persistent cache).
_TRACES: collections.Counter = collections.Counter()


def _counted(fn):
    """fn, counting its traces in _TRACES."""
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        _TRACES[fn.__name__] += 1
        return fn(*args, **kwargs)
    return traced


@functools.partial(jax.jit, static_argnums=(0, 3), donate_argnums=(2,))
@_counted
def decode_slots(graphdef, state, cache, steps: int, s: Slots):
    """Up to `steps` decode steps of every slot, stopping early once no live slot is left going.
    A live slot stops at a stop id or at max_new tokens; the others keep their position. Returns
    (cache, tokens [B, steps] with -1 where a slot produced nothing)."""
    model = nnx.merge(graphdef, state)
    b = s.token.shape[0]

    def cond(carry):
        i, _, _, _, _, done, _ = carry
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, cache, token, pos, count, done, out = carry
        logits, cache = model(token[:, None], pos[:, None], cache)
        new = sampling.sample(logits[:, 0], s.seed, count, s.temperature, s.top_p, s.top_k)
        going = ~done
        token = jnp.where(going, new, token)
        count = count + going
        stop = jnp.any(token[:, None] == s.stop_ids, axis=-1) | (count >= s.max_new)
        out = out.at[:, i].set(jnp.where(going, token, -1))
        return i + 1, cache, token, pos + going, count, done | (going & stop), out

    out = jnp.full((b, steps), -1, jnp.int32)
    carry = (0, cache, s.token, s.pos, s.count, ~s.live, out)
    _, cache, *_, out = jax.lax.while_loop(cond, body, carry)
    return cache, sharding.replicated(out)


@functools.partial(jax.jit, static_argnums=(0, 3, 4), donate_argnums=(2,))
@_counted
def decode_first_rows(graphdef, state, cache, steps: int, rows: int, s: Slots):
    """`decode_slots` over the first `rows` slots only (those past them are free), writing their
    cache rows back: on a CPU every row of a decode step costs compute, so one request in a pool
    of 16 slots would otherwise pay for 16. Costs a copy of those rows in and out per call."""
    first = jax.tree.map(lambda a: jax.lax.slice_in_dim(a, 0, rows, axis=a.ndim - 4), cache)
    first, out = decode_slots(graphdef, state, first, steps, jax.tree.map(lambda x: x[:rows], s))
    put = lambda a, r: jax.lax.dynamic_update_slice(a, r, (0,) * a.ndim)  # noqa: E731
    return jax.tree.map(put, cache, first), out


@functools.partial(jax.jit, static_argnums=(0, 7), donate_argnums=(2,))
@_counted
def prefill_slot(graphdef, state, cache, slot, tokens, start, last, span: int):
    """One chunk of one prompt into row `slot` of the cache: tokens [1, C] at positions
    start..start+C-1 (slot, start, last: traced int32 scalars, so every slot and chunk runs one
    program per (C, span)). Only the first `span` positions of that row are read and written
    (span >= start + C): a prompt's first chunk copies C positions, not the whole row, and the
    other slots are untouched. Returns (cache, the hidden state [1, D] at index `last` of the
    chunk: the prompt's last token when this is its final chunk)."""
    def row(a):  # (..., 1, span, K, E): the slot's row, of a per-layer or stacked cache
        b = a.ndim - 4
        return jax.lax.slice_in_dim(jax.lax.dynamic_slice_in_dim(a, slot, 1, b), 0, span, axis=b + 1)

    def put_row(a, r):
        return jax.lax.dynamic_update_slice(a, r, (0,) * (a.ndim - 4) + (slot, 0, 0, 0))

    rows = jax.tree.map(row, cache)
    positions = start + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]  # (1, C)
    x, rows = nnx.merge(graphdef, state).hidden(tokens, positions, cache=rows)  # (1, C, D)
    return jax.tree.map(put_row, cache, rows), sharding.replicated(x[:, last])


@functools.partial(jax.jit, static_argnums=0)
@_counted
def first_token(graphdef, state, hidden, seed, temperature, top_p, top_k):
    """A request's first token from the hidden state [1, D] of its last prompt token; the
    parameters are [1] arrays as in `Slots`."""
    logits = nnx.merge(graphdef, state).head(hidden)  # (1, V)
    return sharding.replicated(sampling.sample(logits, seed, jnp.zeros_like(top_k), temperature, top_p, top_k))


# --- Requests and what comes back -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request (make one with `Scheduler.make_request`): prompt ids, sampling parameters
    (params.stop_token_ids holds every stop id, eos included), stop strings."""

    prompt: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...] = ()


@dataclasses.dataclass
class Output:
    """One event of a request: its new token ids and the text that became final (text can lag the
    ids: see `Detokenizer`). The last event has a finish_reason: "stop" (a stop id or string),
    "length" (max_new_tokens), "cancelled", or "error" (with `error`)."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int  # so far
    finish_reason: str | None = None
    error: str | None = None
    time_to_first_token_s: float | None = None


class Handle:
    """A submitted request: `cancel()` takes it out of the queue or its slot (a no-op once it has
    finished). Its outputs go to the `on_output` callback given to `submit`, called on the
    scheduler's thread: it must return quickly."""

    _ids = itertools.count()

    def __init__(self, scheduler: "Scheduler", request: Request, on_output: Callable[[Output], None], tokenizer):
        self.id = next(Handle._ids)
        self.request = request
        self.cancelled = False
        self.finished = False
        self._scheduler, self._on_output = scheduler, on_output
        self._text = Detokenizer(tokenizer, request.stop, request.params.stop_token_ids)
        self.slot: int | None = None
        self.prefilled = 0  # prompt tokens in the cache
        self.generated: list[int] = []
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True
        self._scheduler._wake()


# --- The scheduler ---------------------------------------------------------------------------------


class Scheduler:
    """Continuous batching of one model on its device(s).

    max_batch: slots (sequences decoded together); max_seq_len: the context of a request, prompt
    and new tokens (default: the model's, at most 4096; each slot holds a cache row this long);
    prefill_chunk: prompt tokens per prefill step (default the model's runtime.prefill_chunk); a
    long prompt's chunks alternate with the other slots' decode calls, so they wait one chunk, not
    one prompt. max_queue: requests waiting for a slot before `submit` raises QueueFull.
    decode_steps: steps per decode call (tokens reach Python once per call; more steps cost less
    dispatch, fewer let requests join sooner)."""

    def __init__(self, llama, *, max_batch: int = 8, max_seq_len: int | None = None,
                 prefill_chunk: int | None = None, max_queue: int = 64, decode_steps: int = 4):
        config = llama.config
        if max_batch < 1 or max_queue < 0 or decode_steps < 1:
            raise ValueError(f"max_batch ({max_batch}) and decode_steps ({decode_steps}) must be >= 1, "
                             f"max_queue ({max_queue}) >= 0")
        if llama.mesh is not None and sharding.axis_size("batch", llama.mesh) > 1:
            # A prefill is one row: it cannot be split over a data axis.
            raise ValueError("the scheduler needs a mesh without a data axis (dp=1); split the model with tp")
        self.llama = llama
        self.max_batch, self.max_queue, self.decode_steps = max_batch, max_queue, decode_steps
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, config.max_seq_len)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self.chunk = min(prefill_chunk or llama.runtime.prefill_chunk, bucket(self.max_seq_len))
        # A whole number of chunks: a chunk's write must never be clamped back into the row.
        self.cache_len = -(-self.max_seq_len // self.chunk) * self.chunk
        self._stats, self._stats_lock = Stats(), threading.Lock()
        self._graphdef, self._state, self._mesh = llama.graphdef, llama.state, llama.mesh
        with sharding.on_mesh(self._mesh):
            self._cache = init_cache(self._graphdef, self._state, max_batch, self.cache_len, self._mesh)
        b = max_batch
        self._slots: list[Handle | None] = [None] * b
        self._s = Slots(token=np.zeros(b, np.int32), pos=np.zeros(b, np.int32), count=np.zeros(b, np.int32),
                        max_new=np.ones(b, np.int32), stop_ids=np.full((b, MAX_STOP_IDS), -1, np.int32),
                        live=np.zeros(b, bool), temperature=np.zeros(b, np.float32),
                        top_p=np.ones(b, np.float32), top_k=np.zeros(b, np.int32), seed=np.zeros(b, np.uint32))
        self._waiting: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None  # why the loop died, if it did

    # --- The caller's side (any thread) ---

    def make_request(self, prompt, *, max_new_tokens: int | None = None, temperature: float = 0.0,
                     top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                     stop_token_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> Request:
        """A checked Request: prompt (text, or token ids), max_new_tokens (None: the rest of the
        context), sampling as in `Llama.generate`; generation stops at the model's eos ids, at
        `stop_token_ids` and just before any of the `stop` strings. Raises ValueError (one line,
        naming the argument)."""
        config, tokenizer = self.llama.config, self.llama.tokenizer
        [ids] = requests.check_prompts([prompt], tokenizer=tokenizer, vocab_size=config.vocab_size,
                                       max_len=self.max_seq_len, max_new_tokens=0)
        if max_new_tokens is None:
            if len(ids) >= self.max_seq_len:
                raise ValueError(f"prompt: {len(ids)} tokens leave no room for a new token in the context "
                                 f"({self.max_seq_len})")
            max_new_tokens = self.max_seq_len - len(ids)
        eos = self.llama.eos_ids
        stops = list(eos) + [int(i) for i in stop_token_ids if int(i) not in eos]
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_IDS - len(eos)} ids, got {len(stop_token_ids)}")
        params = requests.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, stop_token_ids=stops,
                                          vocab_size=config.vocab_size)
        requests.check_prompts([ids], tokenizer=None, vocab_size=config.vocab_size, max_len=self.max_seq_len,
                               max_new_tokens=params.max_new_tokens)
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop: stop strings must be non-empty strings")
        if stop and tokenizer is None:
            raise ValueError("stop: stop strings need a model with a tokenizer")
        return Request(tuple(ids), params, stop)

    def submit(self, request: Request, on_output: Callable[[Output], None]) -> Handle:
        """Queues a request; its Outputs go to `on_output` (called on the scheduler's thread).
        Raises QueueFull when max_queue requests wait already, NotRunning when stopped."""
        handle = Handle(self, request, on_output, self.llama.tokenizer)
        with self._cond:
            # Before `start` requests queue; after `stop` (or a crash) they are refused.
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise NotRunning(self.error or "the scheduler is stopped")
            # Requests sit in the queue until the scheduler's thread admits them, free slots or not.
            if len(self._waiting) >= self.max_queue + self._slots.count(None):
                with self._stats_lock:
                    self._stats.rejected += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting")
            self._waiting.append(handle)
            self._cond.notify()
        return handle

    @property
    def running(self) -> bool:
        """Whether the thread is serving (False before `start`, after `stop` or a crash)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> "Scheduler":
        """Starts the thread that owns the device (once)."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llama-jax-scheduler", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Stops the thread; requests in flight or waiting finish as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            waiting = [] if self._thread is not None else list(self._waiting)  # never started
            self._waiting.clear()
        for h in waiting:
            self._finish(h, "cancelled")
        if self._thread is not None:
            self._thread.join(timeout)

    def load(self) -> dict:
        """Queue depth and busy slots now."""
        with self._cond:
            return {"waiting": len(self._waiting), "busy": sum(s is not None for s in self._slots),
                    "slots": self.max_batch}

    def stats(self) -> Stats:
        """A copy of the counters and histograms."""
        with self._stats_lock:
            return copy.deepcopy(self._stats)

    def warmup(self) -> None:
        """Compiles, before any request, what every request runs: the first prefill chunk of each
        bucket, the first token, a decode call for each power of two of rows (the later chunks of
        a prompt longer than one chunk compile on first use). Call it before `start`."""
        if self.running:
            raise RuntimeError("warmup runs before start")
        one = lambda dtype, v=0: np.full(1, v, dtype)  # noqa: E731
        c = 16
        while True:
            c = min(c, self.chunk)
            hidden = self._prefill(0, np.zeros((1, c), np.int32), 0, c - 1)
            if c == self.chunk:
                break
            c *= 2
        first_token(self._graphdef, self._state, hidden, one(np.uint32), one(np.float32), one(np.float32, 1),
                    one(np.int32))
        rows = 1
        while True:
            rows = min(rows, self.max_batch)
            jax.block_until_ready(self._decode(rows))
            if rows == self.max_batch:
                break
            rows *= 2

    @staticmethod
    def compiled_programs() -> dict[str, int]:
        """Programs traced so far by each jitted piece (every scheduler of this process together)."""
        return {name: _TRACES[name] for name in ("prefill_slot", "first_token", "decode_slots", "decode_first_rows")}

    # --- The scheduler's thread ---

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping or self._waiting or any(self._slots))
                    if self._stopping:
                        break
                    self._admit()
                for h in self._slots:
                    if h is not None and h.cancelled:
                        self._finish(h, "cancelled")
                try:
                    self._step()
                except Exception as e:  # noqa: BLE001  a device failure: fail what is in flight, keep serving
                    log.exception("scheduler step failed")
                    for h in self._slots:
                        if h is not None:
                            self._finish(h, "error", error=f"{type(e).__name__}: {e}".splitlines()[0])
                    with sharding.on_mesh(self._mesh):  # the donated cache may be gone
                        self._cache = init_cache(self._graphdef, self._state, self.max_batch, self.cache_len,
                                                 self._mesh)
        except BaseException as e:  # noqa: BLE001
            self.error = f"scheduler died: {type(e).__name__}: {e}"
            log.exception("scheduler died")
        finally:
            with self._cond:
                self._stopping = True
                waiting, self._waiting = list(self._waiting), collections.deque()
            for h in waiting + [h for h in self._slots if h is not None]:
                self._finish(h, "cancelled" if self.error is None else "error", error=self.error)

    def _admit(self) -> None:
        """Moves waiting requests into free slots, in order (under the lock)."""
        while self._waiting and None in self._slots:
            h = self._waiting.popleft()
            if h.cancelled:
                self._finish(h, "cancelled")
                continue
            b = self._slots.index(None)
            self._slots[b], h.slot = h, b
            p = h.request.params
            s = self._s
            # Not live until its first token: decode calls write this row at pos = the prompt's
            # length, which its first decode step rewrites before reading.
            s.live[b], s.pos[b], s.count[b], s.max_new[b] = False, len(h.request.prompt), 1, p.max_new_tokens
            s.stop_ids[b] = -1
            s.stop_ids[b, :len(p.stop_token_ids)] = p.stop_token_ids
            s.temperature[b], s.top_p[b] = p.temperature, 1.0 if p.top_p is None else p.top_p
            s.top_k[b], s.seed[b] = p.top_k or 0, p.seed % 2**32

    def _step(self) -> None:
        """Prefill chunks of the oldest prefilling requests, then one decode call of the decoding
        ones. The prefill budget per call is one full chunk of tokens and at most decode_steps
        chunks: a chunk of a short prompt costs about a decode step (both read every weight), so
        a burst of arrivals is prefilled a few per call, while the decoding slots wait at most
        about as long again as their own call takes."""
        tokens = calls = 0
        while tokens < self.chunk and calls < self.decode_steps:
            prefilling = [h for h in self._slots if h is not None and h.first_token_at is None]
            if not prefilling:
                break
            tokens += self._prefill_next(min(prefilling, key=lambda h: h.id))
            calls += 1
        if self._s.live.any():
            out = np.asarray(self._decode())
            for b, h in enumerate(self._slots):
                if h is not None and self._s.live[b]:
                    new = [int(t) for t in out[b] if t >= 0]
                    self._s.pos[b] += len(new)
                    self._s.count[b] += len(new)
                    self._s.token[b] = new[-1] if new else self._s.token[b]
                    self._emit(h, new)

    def _prefill(self, slot: int, tokens: np.ndarray, start: int, last: int):
        # A first chunk sees only itself; a later one the whole row (one program per chunk bucket
        # each, where a span per power of two would multiply them).
        span = tokens.shape[1] if start == 0 else self.cache_len
        with sharding.on_mesh(self._mesh):
            self._cache, hidden = prefill_slot(self._graphdef, self._state, self._cache, np.int32(slot), tokens,
                                               np.int32(start), np.int32(last), span)
        return hidden

    def _decode(self, rows: int | None = None):
        """One decode call over the first `rows` slots (default: a power of two covering every busy
        slot; requests take the lowest free slot, so the busy ones stay near the front)."""
        if rows is None:
            last = max((b for b, h in enumerate(self._slots) if h is not None), default=0)
            rows = min(self.max_batch, bucket(last + 1, minimum=1))
        with sharding.on_mesh(self._mesh):
            if rows == self.max_batch:
                self._cache, out = decode_slots(self._graphdef, self._state, self._cache, self.decode_steps, self._s)
            else:
                self._cache, out = decode_first_rows(self._graphdef, self._state, self._cache, self.decode_steps,
                                                     rows, self._s)
        return out

    def _prefill_next(self, h: Handle) -> int:
        """Prefills the request's next chunk (and samples its first token after the last); returns
        the chunk's length."""
        prompt, b = h.request.prompt, h.slot
        start, n = h.prefilled, len(prompt)
        c = min(bucket(n - start), self.chunk)  # a full chunk, or the bucket of what is left
        tokens = np.zeros((1, c), np.int32)
        tokens[0, :min(c, n - start)] = prompt[start:start + c]
        hidden = self._prefill(b, tokens, start, min(c, n - start) - 1)
        h.prefilled = min(n, start + c)
        if h.prefilled < n:
            return c
        s = self._s
        token = first_token(self._graphdef, self._state, hidden, s.seed[b:b + 1], s.temperature[b:b + 1],
                            s.top_p[b:b + 1], s.top_k[b:b + 1])
        token = int(np.asarray(token)[0])
        h.first_token_at = time.perf_counter()
        s.token[b], s.live[b] = token, True
        self._emit(h, [token])
        return c

    def _emit(self, h: Handle, new: list[int]) -> None:
        """Hands a request its new tokens and text, and finishes it at a stop id, a stop string or
        max_new_tokens (the device stops at the same stop ids and length; the rest of a decode
        call's tokens after a stop string are dropped)."""
        p = h.request.params
        reason, text = None, ""
        for i, t in enumerate(new):
            text += h._text.add([t])
            if h._text.stopped:  # a stop string: the tokens after the one that completed it go
                reason = "stop"
            elif t in p.stop_token_ids:
                reason = "stop"
            elif len(h.generated) + i + 1 >= p.max_new_tokens:
                reason = "length"
            if reason is not None:
                new = new[:i + 1]
                break
        h.generated += new
        if reason is not None:
            self._finish(h, reason, new=new, text=text)
        else:
            self._deliver(h, Output(new, text, len(h.request.prompt), len(h.generated)))

    def _finish(self, h: Handle, reason: str, *, new=(), text: str = "", error: str | None = None) -> None:
        if h.finished:
            return
        h.finished = True
        if h.slot is not None:
            b, h.slot = h.slot, None
            self._slots[b] = None
            self._s.live[b], self._s.pos[b] = False, 0  # a free row writes at 0 and reads 1 key
        if reason in ("stop", "length"):
            text += h._text.finish()
        end = time.perf_counter()
        ttft = None if h.first_token_at is None else h.first_token_at - h.submitted
        with self._stats_lock:
            st = self._stats
            st.requests[reason] += 1
            st.prompt_tokens += len(h.request.prompt) if h.first_token_at is not None else 0
            st.generation_tokens += len(h.generated)
            if ttft is not None:
                st.time_to_first_token_s.observe(ttft)
                if len(h.generated) > 1 and end > h.first_token_at:
                    st.decode_tokens_per_s.observe((len(h.generated) - 1) / (end - h.first_token_at))
        self._deliver(h, Output(list(new), text, len(h.request.prompt), len(h.generated), reason, error, ttft))

    def _deliver(self, h: Handle, out: Output) -> None:
        try:
            h._on_output(out)
        except Exception:  # noqa: BLE001  a listener that fails has gone: stop working for it
            log.exception("on_output failed; cancelling request %d", h.id)
            h.cancelled = True
