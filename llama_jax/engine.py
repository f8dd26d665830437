"""The engine: one for `Llama.generate`, `stream`, `chat` and the server. Knows nothing of HTTP.

vLLM's split: a model runner (llama_jax.runner: the jitted prefill and decode programs over a paged
KV cache), a scheduler of policy only (llama_jax.scheduler: admission, chunking, preemption, over
llama_jax.block_pool's blocks and prefix cache), and this module, which turns requests into
sequences, runs each step the scheduler plans, and turns tokens into `Output`s (text through the
detokenizer, stop strings, finish reasons, stats).

`Engine` has no thread: `Llama.generate` steps it until its requests finish; `EngineThread` owns
one on a thread for the server. One random scheme (llama_jax.sampling): a request's token number n
is sampled with fold_in(key(seed), n) from its own logits, so a request gives the same tokens for
the same seed alone or in any batch, through Python or HTTP, before or after a preemption.

A request may ask for a JSON schema (its matcher, llama_jax.structured, masks each of its tokens on
the device) and for log-probabilities; a call none of whose rows asks for either runs the very
programs it ran before these options existed, so their tokens are unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import copy
import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import requests, sharding, structured
from llama_jax.block_pool import BlockPool
from llama_jax.detokenizer import Detokenizer
from llama_jax.metrics import Stats
from llama_jax.requests import SamplingParams
from llama_jax.runner import MAX_STOP_IDS, GrammarCall, ModelRunner, Rows, Sampling, decode, prefill, verify
from llama_jax.sampling import Logprobs
from llama_jax.scheduler import Scheduler, Sequence as Seq, bucket, chunk_rows
from llama_jax.speculative import SpeculativeConfig, propose_ngram, with_draft

log = logging.getLogger("llama_jax.engine")

DEFAULT_MAX_SEQ_LEN = 4096  # the server's context when the model's is longer
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block (vLLM's default; docs/PERFORMANCE.md has the measurement)
CPU_KV_CACHE_BYTES = 1 << 30  # the pool's default size on a CPU
GPU_KV_CACHE_SHARE = 0.9  # of the device memory free after the weights, as vLLM's gpu_memory_utilization
MIN_TABLE_WIDTH = 16  # blocks: a prefill's block table is padded to a power of two, at least this
# Decode steps per call: one request through HTTP decoded 0.92x Llama.generate's tokens/s at 8, 0.85x
# at 4 (each call's tokens cost a round of Python and a streamed chunk); a new request waits at most
# one call to start (8 steps: about 130 ms for one SmolLM2 row on 2 CPU cores).
DEFAULT_DECODE_STEPS = 8
MAX_SPEC_MISSES = 4  # the backoff after verifies that keep nothing grows no further (_verify)


class QueueFull(Exception):
    """The waiting queue is full; try again later."""


class NotRunning(Exception):
    """The engine's thread is stopped (or was never started)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """A checked request (make one with `Engine.make_request`): prompt ids, sampling parameters
    (params.stop_token_ids holds every stop id, eos included unless ignore_eos), stop strings."""

    prompt: tuple[int, ...]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    adapter: int = 0  # the LoRA adapter it runs with: 1 + its index in llama.adapter_names; 0: none


class TokenLogprob(NamedTuple):
    """A generated token's log-probability in the distribution it was drawn from, and the best
    tokens there, as many as its request asked: (id, logprob), best first (tokens a grammar left
    out are never among them)."""

    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclasses.dataclass
class Output:
    """One event of a request: its new token ids and the text that became final (text can lag the
    ids: see `Detokenizer`), with each id's TokenLogprob when the request asked for them. The last
    event has a finish_reason: "stop" (a stop id or string, or the end of its grammar), "length"
    (max_new_tokens), "cancelled", or "error" (with `error`)."""

    token_ids: list[int]
    text: str
    prompt_tokens: int
    completion_tokens: int  # so far
    finish_reason: str | None = None
    error: str | None = None
    time_to_first_token_s: float | None = None
    cached_tokens: int = 0  # prompt tokens found in the prefix cache
    logprobs: list[TokenLogprob] | None = None


class Handle:
    """A submitted request: `cancel()` takes it out of the engine at its next step (a no-op once it
    has finished). Its outputs go to the `on_output` callback given to `add`, called on the
    engine's thread: it must return quickly."""

    _ids = itertools.count()

    def __init__(self, engine: "Engine", request: Request, on_output: Callable[[Output], None]):
        self.id = next(Handle._ids)
        self.request = request
        self.cancelled = False
        self.finished = False
        self.seq = Seq(request.prompt, request.params, adapter=request.adapter)
        self._engine, self._on_output = engine, on_output
        self._text = Detokenizer(engine.llama.tokenizer, request.stop, request.params.stop_token_ids)
        p = request.params
        # Its place in its grammar: it has accepted every token the request generated so far.
        self.matcher = (None if p.json_schema is None
                        else engine.grammars.matcher(p.json_schema, p.stop_token_ids, p.json_or_text))
        self.completion_tokens = 0  # handed out
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True
        self._engine._wake()


class Engine:
    """Continuous batching of one model over a paged KV cache.

    max_batch: most sequences running at once (decoded together), not a memory reservation;
    max_seq_len: the longest request, prompt and new tokens (default: the model's context, at most
    4096); kv_cache_tokens: the pool's size (default: CPU_KV_CACHE_BYTES of cache on a CPU,
    GPU_KV_CACHE_SHARE of the free memory on a GPU; at least max_seq_len, at most max_batch times
    it); block_size: tokens per block; prefill_chunk: prompt tokens per step (default the model's runtime.prefill_chunk);
    decode_steps: steps per decode call (tokens reach Python once per call: more cost less
    dispatch, fewer let requests join sooner); prefix_caching: reuse the blocks of prefixes seen
    before; speculative: a llama_jax.speculative.SpeculativeConfig (or its dict), or None."""

    def __init__(self, llama, *, max_batch: int = 8, max_seq_len: int | None = None,
                 kv_cache_tokens: int | None = None, block_size: int = DEFAULT_BLOCK_SIZE,
                 prefill_chunk: int | None = None, decode_steps: int = DEFAULT_DECODE_STEPS,
                 prefix_caching: bool = True, speculative=None):
        config = llama.config
        if max_batch < 1 or decode_steps < 1:
            raise ValueError(f"max_batch ({max_batch}) and decode_steps ({decode_steps}) must be >= 1")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if not runs_on(llama.mesh):
            raise ValueError("the engine needs a mesh without data or context axes (dp=cp=1); split the model "
                             "with tp")
        self.llama = llama
        self.speculative = with_draft(SpeculativeConfig.of(speculative), llama)
        draft = self.speculative.model if self.speculative is not None else None  # a Llama, or None
        self.max_batch, self.decode_steps, self.block_size = max_batch, decode_steps, block_size
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, config.max_seq_len,
                               draft.config.max_seq_len if draft is not None else config.max_seq_len)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2, got {self.max_seq_len}")
        self.chunk = min(prefill_chunk or llama.runtime.prefill_chunk, bucket(self.max_seq_len))
        if kv_cache_tokens is None:  # more than max_batch whole contexts is never needed
            kv_cache_tokens = max(self.max_seq_len,
                                  min(default_kv_cache_tokens(llama, draft), max_batch * self.max_seq_len))
        if kv_cache_tokens < block_size:
            raise ValueError(f"kv_cache_tokens ({kv_cache_tokens}) must hold at least one block of {block_size}")
        num_blocks = kv_cache_tokens // block_size + 1  # and the null block
        self.pool = BlockPool(num_blocks, block_size, prefix_caching=prefix_caching)
        self.scheduler = Scheduler(self.pool, max_batch=max_batch, chunk=self.chunk)
        self.runner = ModelRunner(llama, num_blocks, block_size)
        # The draft's pool has the same blocks, so a sequence's block table indexes both.
        self.draft_runner = None if draft is None else ModelRunner(draft, num_blocks, block_size)
        # A decode's block table: its width costs a decode nothing (the attention reads each row's
        # blocks up to its length), so one width, and one program per row count.
        self.max_width = self._width(self.max_seq_len)
        self.handles: dict[Seq, Handle] = {}
        self.spec_proposed = self.spec_accepted = 0  # proposed tokens verified, and kept
        self.spec_steps = 0  # sequences' verify steps that had proposals
        self.stats_lock = threading.Lock()
        self._stats = Stats()
        self._wake = lambda: None  # EngineThread's, to notice a cancel

    @property
    def grammars(self) -> structured.Grammars:
        """The model's grammars (compiled once per schema, shared by its engines), made at the first
        request with one."""
        return structured.grammars_for(self.llama.tokenizer, self.llama.config.vocab_size, self.llama.eos_ids)

    @property
    def kv_cache_tokens(self) -> int:
        return self.pool.usable * self.block_size

    # --- Requests ---

    def make_request(self, prompt, *, max_new_tokens: int | None = None, temperature: float = 0.0,
                     top_p: float | None = None, top_k: int | None = None, seed: int = 0,
                     stop_token_ids: Sequence[int] = (), stop: Sequence[str] = (), ignore_eos: bool = False,
                     json_schema=None, json_or_text: bool = False, logprobs: int | None = None,
                     adapter: str | None = None) -> Request:
        """A checked Request: prompt (text, or token ids), max_new_tokens (None: the rest of the
        context), sampling as in `Llama.generate`; generation stops at the model's eos ids (unless
        ignore_eos), at `stop_token_ids` and just before any of the `stop` strings. json_schema (a
        dict or its text): the answer follows it (compiled here, or found in the cache), ending
        with a stop id where the JSON ends; json_or_text: or is text not beginning with "{" (a tool
        call or a plain answer); logprobs: report each token's log-probability and this many
        alternatives (0 to 20); adapter: the name of a LoRA adapter the model serves
        (`load(adapters=...)`), None for the base. Raises ValueError (one line, naming the
        argument), also for a request the whole KV pool cannot hold or a schema that does not compile."""
        config, tokenizer = self.llama.config, self.llama.tokenizer
        names = self.llama.adapter_names
        if adapter is not None and adapter not in names:
            raise ValueError(f"adapter: {adapter!r} is not served (adapters: {', '.join(names) or 'none'})")
        adapter_id = 0 if adapter is None else names.index(adapter) + 1
        context = min(self.max_seq_len, self.kv_cache_tokens)
        [ids] = requests.check_prompts([prompt], tokenizer=tokenizer, vocab_size=config.vocab_size,
                                       max_len=context, max_new_tokens=0)
        if max_new_tokens is None:
            if len(ids) >= context:
                raise ValueError(f"prompt: {len(ids)} tokens leave no room for a new token in the context "
                                 f"({context})")
            max_new_tokens = context - len(ids)
        eos = () if ignore_eos else self.llama.eos_ids
        stops = list(eos) + [int(i) for i in stop_token_ids if int(i) not in eos]
        if len(stops) > MAX_STOP_IDS:
            raise ValueError(f"stop_token_ids: at most {MAX_STOP_IDS - len(eos)} ids, got {len(stop_token_ids)}")
        params = requests.sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                          top_p=top_p, seed=seed, stop_token_ids=stops,
                                          vocab_size=config.vocab_size, json_schema=json_schema,
                                          json_or_text=json_or_text, logprobs=logprobs)
        if params.json_schema is not None:  # a bad schema fails here, before it is queued
            self.grammars.compile(params.json_schema, params.json_or_text)
        requests.check_prompts([ids], tokenizer=None, vocab_size=config.vocab_size, max_len=self.max_seq_len,
                               max_new_tokens=params.max_new_tokens)
        if len(ids) + params.max_new_tokens > self.kv_cache_tokens:
            raise ValueError(f"max_new_tokens: the prompt ({len(ids)} tokens) and {params.max_new_tokens} new "
                             f"tokens need more than the whole KV cache ({self.kv_cache_tokens} tokens)")
        stop = tuple(stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop: stop strings must be non-empty strings")
        if stop and tokenizer is None:
            raise ValueError("stop: stop strings need a model with a tokenizer")
        return Request(tuple(ids), params, stop, adapter_id)

    def add(self, request: Request, on_output: Callable[[Output], None]) -> Handle:
        """Queues a checked request; its Outputs go to `on_output` as the engine steps."""
        h = Handle(self, request, on_output)
        self._enqueue(h)
        return h

    def _enqueue(self, h: Handle) -> None:
        self.handles[h.seq] = h
        self.scheduler.add(h.seq)

    def has_work(self) -> bool:
        return bool(self.handles)

    def load(self) -> dict:
        """Requests waiting and running now, and the KV blocks."""
        s = self.scheduler
        return {"waiting": len(s.waiting), "running": len(s.running), "max_batch": self.max_batch,
                "kv_blocks_used": self.pool.used(), "kv_blocks_total": self.pool.usable}

    def stats(self) -> Stats:
        """A copy of the counters and histograms."""
        with self.stats_lock:
            st = copy.deepcopy(self._stats)
        st.preemptions, st.prefix_cache_hit_tokens = self.scheduler.preemptions, self.scheduler.prefix_hit_tokens
        st.spec_proposed_tokens, st.spec_accepted_tokens = self.spec_proposed, self.spec_accepted
        return st

    # --- A step ---

    def step(self) -> None:
        """Cancels what was cancelled, prefills a chunk, runs a decode call. A device failure fails
        the requests in flight (finish_reason "error") and gives the runner a fresh pool."""
        for h in [h for h in self.handles.values() if h.cancelled]:
            self._finish(h, "cancelled")
        try:
            self.prefill_step()
            self.decode_step()
        except Exception as e:  # noqa: BLE001  fail what is in flight, keep serving
            log.exception("engine step failed")
            for h in list(self.handles.values()):
                if h.seq.blocks:
                    self._finish(h, "error", error=f"{type(e).__name__}: {e}".splitlines()[0])
            self.runner.reset()  # the pool was donated: it may be gone, and what it held with it
            self.pool.reset_prefix_cache()

    def prefill_step(self) -> None:
        """Admits what the scheduler lets in and prefills this step's chunk (first tokens out)."""
        rows = self.scheduler.schedule_prefill()
        if rows:
            self._prefill(rows)

    def decode_step(self) -> None:
        """One decode call of the decoding sequences (preempting the newest while blocks are short),
        or, when speculating and some sequence has proposals, one verify call."""
        decoding = [seq for seq in self.scheduler.running if seq.prefilled]
        # A verify takes no grammar masks and reports no log-probabilities: with such a row in the
        # batch, this step decodes.
        if self.speculative is not None and not any(self._options(self.handles[seq]) for seq in decoding):
            seqs = self.scheduler.schedule_decode(self.speculative.num_speculative_tokens + 1)
            proposals = self._propose(seqs)
            if any(proposals):
                self._verify(seqs, proposals)
            elif seqs:
                self._decode(seqs)
            return
        seqs = self.scheduler.schedule_decode(self.steps_per_decode)
        if seqs:
            self._decode(seqs)

    @staticmethod
    def _options(h: Handle) -> bool:
        return h.matcher is not None or h.request.params.logprobs is not None

    @property
    def steps_per_decode(self) -> int:
        """Steps of a decode call: decode_steps, or, when speculating, no more than a verify makes
        tokens (a sequence with no proposal now looks again that soon)."""
        if self.speculative is None:
            return self.decode_steps
        return min(self.decode_steps, self.speculative.num_speculative_tokens + 1)

    def _propose(self, seqs: list[Seq]) -> list[list[int]]:
        """Each sequence's proposed next tokens, none while it backs off (see _verify)."""
        sp = self.speculative
        sizes = []
        for seq in seqs:
            room = seq.params.max_new_tokens - len(seq.generated) - 1  # the verify adds one token of its own
            backing_off = len(seq.tokens) < seq.spec_resume
            sizes.append(0 if backing_off else max(0, min(sp.num_speculative_tokens, room)))
        if sp.method == "draft":
            return self._propose_draft(seqs, sizes)
        return [propose_ngram(seq.tokens, k, sp.prompt_lookup_max, sp.prompt_lookup_min) if k else []
                for seq, k in zip(seqs, sizes)]

    def _propose_draft(self, seqs: list[Seq], sizes: list[int]) -> list[list[int]]:
        """The draft model's next tokens for the sequences with a size: one decode call (after a
        catch-up of the tokens its pool lacks), each row drawing as the target will there (its seed
        and sampling, token number n with the key of n). The call makes K + 1 tokens, the last
        dropped: its step writes the K-th proposal into the draft's pool, so that when the target
        keeps every proposal no catch-up call (a prefill, dearer than a decode step) follows."""
        chosen = [seq for seq, k in zip(seqs, sizes) if k]
        if not chosen:
            return [[] for _ in seqs]
        self._draft_catch_up(chosen)
        steps = self.speculative.num_speculative_tokens + 1
        b = bucket(len(chosen), minimum=1)
        for seq in chosen:
            # Its keys and values at the K + 1 positions from the last token on: _verify keeps those
            # of the proposals the target keeps.
            seq.draft_computed = len(seq.tokens) - 1 + steps
        out, _ = self.draft_runner.decode(steps, self._rows(chosen, b, steps),
                                          self._table(chosen, b, self.max_width))
        drafted = {seq: [int(t) for t in out[i]] for i, seq in enumerate(chosen)}
        return [drafted[seq][:k] if k else [] for seq, k in zip(seqs, sizes)]

    def _draft_catch_up(self, seqs: list[Seq]) -> None:
        """Prefills into the draft's pool every token but the last of each sequence that it has not
        computed (a new prompt, or what the target decoded alone while the sequence backed off), in
        chunks as the target's prefill takes them."""
        while True:
            behind = [seq for seq in seqs if seq.draft_computed < len(seq.tokens) - 1]
            if not behind:
                return
            rows = chunk_rows(behind, [len(seq.tokens) - 1 - seq.draft_computed for seq in behind], self.chunk)
            r, c = bucket(len(rows), minimum=1), max(min(bucket(n), self.chunk) for _, n in rows)
            tokens, start = np.zeros((r, c), np.int32), np.zeros(r, np.int32)
            for i, (seq, n) in enumerate(rows):
                tokens[i, :n] = seq.tokens[seq.draft_computed:seq.draft_computed + n]
                start[i] = seq.draft_computed
            width = self._width(max(seq.draft_computed + n for seq, n in rows))
            zeros = np.zeros(r, np.int32)
            self.draft_runner.prefill(tokens, start, self._table([seq for seq, _ in rows], r, width), zeros, zeros,
                                      _sampling_zeros(r))
            for seq, n in rows:
                seq.draft_computed += n

    def _verify(self, seqs: list[Seq], proposals: list[list[int]]) -> None:
        """One forward of each row's last token and proposals: keeps the proposals up to the first
        the target samples otherwise, then its own token. A verify that keeps none costs the
        sequence its proposing for the next (K + 1) * 4^(m - 1) tokens, m such verifies in a row (up
        to 4: at K = 4, 5, 20, 80 then 320 tokens), so where guesses fail a verify, dearer than a
        decode step, comes seldom."""
        r, c = bucket(len(seqs), minimum=1), self.speculative.num_speculative_tokens + 1
        tokens, start, count = np.zeros((r, c), np.int32), np.zeros(r, np.int32), np.zeros(r, np.int32)
        for i, (seq, drafts) in enumerate(zip(seqs, proposals)):
            tokens[i, 0], tokens[i, 1:1 + len(drafts)] = seq.tokens[-1], drafts
            start[i], count[i] = len(seq.tokens) - 1, len(seq.generated)
        width = self._width(int(start.max()) + c)
        out = self.runner.verify(tokens, start, self._table(seqs, r, width), count, self._sampling(seqs, r),
                                 self._adapter_rows(seqs, r))
        for i, (seq, drafts) in enumerate(zip(seqs, proposals)):
            kept = 0
            while kept < len(drafts) and out[i, kept] == drafts[kept]:
                kept += 1
            if drafts:
                self.spec_steps += 1
                self.spec_proposed += len(drafts)
                self.spec_accepted += kept
                seq.spec_misses = 0 if kept else min(seq.spec_misses + 1, MAX_SPEC_MISSES)
                if not kept:
                    seq.spec_resume = len(seq.tokens) + 1 + c * 4 ** (seq.spec_misses - 1)
            # The draft's pool holds the last token and the kept proposals, not what followed them.
            seq.draft_computed = min(seq.draft_computed, len(seq.tokens) + kept)
            new = [int(t) for t in out[i, :kept + 1]]  # the kept proposals, then the model's own next token
            self._emit(self.handles[seq], new, fed=len(new))

    def _width(self, tokens: int) -> int:
        """The width of a block table that covers the first `tokens` positions: a power of two of
        blocks, at least MIN_TABLE_WIDTH (the table's width is a program's shape)."""
        return bucket(self.scheduler.blocks_for(tokens), minimum=MIN_TABLE_WIDTH)

    def _table(self, seqs: list[Seq], rows: int, width: int) -> np.ndarray:
        table = np.zeros((rows, width), np.int32)  # the null block where no block is
        for i, seq in enumerate(seqs):
            blocks = seq.blocks[:width]
            table[i, :len(blocks)] = blocks
        return table

    @staticmethod
    def _adapter_rows(seqs: list[Seq], rows: int) -> np.ndarray:
        """Each row's adapter id [rows] (padding rows: 0, the base)."""
        ids = np.zeros(rows, np.int32)
        ids[:len(seqs)] = [seq.adapter for seq in seqs]
        return ids

    def _sampling(self, seqs: list[Seq], rows: int) -> Sampling:
        s = _sampling_zeros(rows)
        for i, seq in enumerate(seqs):
            p = seq.params
            s.seed[i], s.temperature[i] = p.seed % 2**32, p.temperature
            s.top_p[i], s.top_k[i] = 1.0 if p.top_p is None else p.top_p, p.top_k or 0
        return s

    def _prefill(self, rows: list[tuple[Seq, int]]) -> None:
        seqs = [seq for seq, _ in rows]
        r = bucket(len(rows), minimum=1)
        c = max(min(bucket(n), self.chunk) for _, n in rows)
        # The blocks up to each chunk's end: the chunk attends to those only (the later ones of a
        # long prompt are allocated already, but gathering them would cost every chunk the whole prompt).
        width = self._width(max(seq.computed + n for seq, n in rows))
        tokens, start = np.zeros((r, c), np.int32), np.zeros(r, np.int32)
        last, count = np.zeros(r, np.int32), np.zeros(r, np.int32)
        for i, (seq, n) in enumerate(rows):
            tokens[i, :n] = seq.tokens[seq.computed:seq.computed + n]
            start[i], last[i], count[i] = seq.computed, n - 1, len(seq.generated)
        # Rows whose chunk ends their known tokens keep the token sampled here: with their options.
        ending = [self.handles[seq] if seq.computed + n == len(seq.tokens) else None for seq, n in rows]
        matchers = [h.matcher if h else None for h in ending] + [None] * (r - len(rows))
        allowed = None
        if any(matchers):
            allowed = structured.next_masks(matchers, structured.mask_width(self.llama.config.vocab_size))
        logprobs = any(h is not None and h.request.params.logprobs is not None for h in ending)
        out, lp = self.runner.prefill(tokens, start, self._table(seqs, r, width), last, count,
                                      self._sampling(seqs, r), allowed, logprobs=logprobs,
                                      rows=self._adapter_rows(seqs, r))
        lp = None if lp is None else Logprobs(*(a[:, None] for a in lp))  # one step per row
        for i, (seq, n) in enumerate(rows):
            self.scheduler.computed(seq, n)
            if seq.computed == len(seq.tokens):  # the last known token: its sample is the next token
                seq.prefilled = True
                h = self.handles[seq]
                if h.matcher is not None:
                    h.matcher.accept(int(out[i]))
                self._emit(h, [int(out[i])], lps=_token_logprobs(lp, h, i, slice(None)))

    def _rows(self, seqs: list[Seq], rows: int, steps: int | None = None) -> Rows:
        """A decode call's rows for seqs, padded to `rows`: from each one's last token, stopping at
        its stop ids and max_new_tokens, or (a draft's call) after `steps` tokens, at no stop id."""
        r = Rows(token=np.zeros(rows, np.int32), pos=np.zeros(rows, np.int32), count=np.zeros(rows, np.int32),
                 max_new=np.ones(rows, np.int32), stop_ids=np.full((rows, MAX_STOP_IDS), -1, np.int32),
                 live=np.arange(rows) < len(seqs), sampling=self._sampling(seqs, rows))
        for i, seq in enumerate(seqs):
            p, made = seq.params, len(seq.generated)
            r.token[i], r.pos[i], r.count[i] = seq.tokens[-1], len(seq.tokens) - 1, made
            if steps is None:
                r.max_new[i] = p.max_new_tokens
                r.stop_ids[i, :len(p.stop_token_ids)] = p.stop_token_ids
            else:
                r.max_new[i] = made + steps
        return r

    def _decode(self, seqs: list[Seq]) -> None:
        b = bucket(len(seqs), minimum=1)
        rows = self._rows(seqs, b)
        handles = [self.handles[seq] for seq in seqs]
        matchers = [h.matcher for h in handles] + [None] * (b - len(seqs))
        logprobs = any(h.request.params.logprobs is not None for h in handles)
        table = self._table(seqs, b, self.max_width)
        if any(matchers):
            width = structured.mask_width(self.llama.config.vocab_size)
            with structured.registered(matchers, width) as call:
                grammar = GrammarCall(structured.next_masks(matchers, width), np.int32(call))
                out, lp = self.runner.decode(self.steps_per_decode, rows, table, grammar, logprobs=logprobs,
                                             adapter_rows=self._adapter_rows(seqs, b))
        else:
            out, lp = self.runner.decode(self.steps_per_decode, rows, table, logprobs=logprobs,
                                         adapter_rows=self._adapter_rows(seqs, b))
        for i, (seq, h) in enumerate(zip(seqs, handles)):
            made = out[i] >= 0
            new = [int(t) for t in out[i][made]]
            self._emit(h, new, fed=len(new), lps=_token_logprobs(lp, h, i, made))

    # --- Outputs ---

    def _emit(self, h: Handle, new: list[int], fed: int = 0, lps: list[TokenLogprob] | None = None) -> None:
        """Appends a request's new tokens (`fed`: how many tokens the device wrote to the cache to
        make them; `lps`: their TokenLogprobs, when the request asked), hands out their text, and
        finishes it at a stop id, a stop string or max_new_tokens (the device stops at the same ids
        and length; the rest of a call's tokens after a stop string are dropped)."""
        seq, p = h.seq, h.request.params
        seq.tokens += new
        if fed:
            self.scheduler.computed(seq, fed)
        if h.first_token_at is None and new:
            h.first_token_at = time.perf_counter()
        reason, text, done = None, "", len(seq.generated) - len(new)
        for i, t in enumerate(new):
            text += h._text.add([t])
            if h._text.stopped or t in p.stop_token_ids:  # a stop string: the tokens after it go
                reason = "stop"
            elif done + i + 1 >= p.max_new_tokens:
                reason = "length"
            if reason is not None:
                new = new[:i + 1]
                break
        if lps is not None:
            lps = lps[:len(new)]
        h.completion_tokens += len(new)
        if reason is not None:
            self._finish(h, reason, new=new, text=text, lps=lps)
        else:
            self._deliver(h, Output(new, text, len(h.request.prompt), h.completion_tokens,
                                    cached_tokens=seq.cached_tokens, logprobs=lps))

    def _finish(self, h: Handle, reason: str, *, new=(), text: str = "", error: str | None = None,
                lps: list[TokenLogprob] | None = None) -> None:
        if h.finished:
            return
        h.finished = True
        self.scheduler.remove(h.seq)
        self.handles.pop(h.seq, None)
        if reason in ("stop", "length"):
            text += h._text.finish()
        end = time.perf_counter()
        ttft = None if h.first_token_at is None else h.first_token_at - h.submitted
        sent = h.completion_tokens
        with self.stats_lock:
            st = self._stats
            st.requests[reason] += 1
            st.prompt_tokens += len(h.request.prompt) if h.first_token_at is not None else 0
            st.generation_tokens += sent
            if ttft is not None:
                st.time_to_first_token_s.observe(ttft)
                if sent > 1 and end > h.first_token_at:
                    st.decode_tokens_per_s.observe((sent - 1) / (end - h.first_token_at))
        if lps is None and h.request.params.logprobs is not None:
            lps = []
        self._deliver(h, Output(list(new), text, len(h.request.prompt), sent, reason, error, ttft,
                                h.seq.cached_tokens, lps))

    def _deliver(self, h: Handle, out: Output) -> None:
        try:
            h._on_output(out)
        except Exception:  # noqa: BLE001  a listener that fails has gone: stop working for it
            log.exception("on_output failed; cancelling request %d", h.id)
            h.cancelled = True

    # --- Compilation ---

    def warmup(self) -> dict[str, int]:
        """Compiles, before any request, what short requests run: a one-row prefill of each chunk
        length up to 256 tokens, and a decode call (and a verify, when speculating, and the draft's
        prefills and decodes) for each power of two of rows up to max_batch (longer chunks and
        batched prefills compile on first use, or come from JAX's compilation cache). The programs
        compile ahead of time, several at once (XLA compiles one on one core). Returns the
        programs prepared, by name (compiled, or read from the cache)."""
        before = ModelRunner.compiled_programs()
        r, d = self.runner, self.draft_runner
        programs = []
        c = 16
        while c <= min(self.chunk, 256):
            args = (np.zeros((1, c), np.int32), np.zeros(1, np.int32), np.zeros((1, self._width(c)), np.int32),
                    np.zeros(1, np.int32), np.zeros(1, np.int32), _sampling_zeros(1))
            programs.append((r, prefill, args, r.adapters(np.zeros(1, np.int32))))
            if d is not None:
                programs.append((d, prefill, args, {}))
            c *= 2
        b = 1
        while True:
            b = min(b, bucket(self.max_batch, minimum=1))
            z = lambda dtype: np.zeros(b, dtype)  # noqa: E731
            rows = Rows(z(np.int32), z(np.int32), z(np.int32), np.ones(b, np.int32),
                        np.full((b, MAX_STOP_IDS), -1, np.int32), z(bool), _sampling_zeros(b))
            table = np.zeros((b, self.max_width), np.int32)
            programs.append((r, decode, (self.steps_per_decode, rows, table), r.adapters(z(np.int32))))
            if self.speculative is not None:  # a verify of contexts up to MIN_TABLE_WIDTH blocks
                k = self.speculative.num_speculative_tokens
                programs.append((r, verify, (np.zeros((b, k + 1), np.int32), z(np.int32),
                                             np.zeros((b, MIN_TABLE_WIDTH), np.int32), z(np.int32),
                                             _sampling_zeros(b)), r.adapters(z(np.int32))))
                if d is not None:  # the draft's K + 1 steps
                    programs.append((d, decode, (k + 1, rows, table), {}))
            if b >= self.max_batch:
                break
            b *= 2

        def compile_one(program):
            runner, fn, args, kwargs = program
            with sharding.on_mesh(runner.mesh):
                fn.lower(runner.graphdef, runner.state, runner.pool, *args, **kwargs).compile()
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(compile_one, programs))
        after = ModelRunner.compiled_programs()
        return {k: after[k] - before[k] for k in after}


def runs_on(mesh) -> bool:
    """Whether the engine runs on `mesh`: one pool is shared by every row, so it can be split by KV
    heads only, not by rows or the sequence (data or context parallel)."""
    return mesh is None or (sharding.axis_size("batch", mesh) == 1 and sharding.axis_size("seq", mesh) == 1)


def _token_logprobs(lp: Logprobs | None, h: Handle, row: int, made) -> list[TokenLogprob] | None:
    """Request h's TokenLogprobs from a call's Logprobs (numpy, [rows, steps, ...]): row `row`'s, at
    the steps `made` selects; None when it asked for none."""
    n = h.request.params.logprobs
    if n is None or lp is None:
        return None
    return [TokenLogprob(float(t), tuple((int(i), float(v)) for i, v in zip(ids[:n], vs[:n]) if v > -np.inf))
            for t, ids, vs in zip(*(a[row][made] for a in lp))]


def _sampling_zeros(rows: int) -> Sampling:
    return Sampling(np.zeros(rows, np.uint32), np.zeros(rows, np.float32), np.ones(rows, np.float32),
                    np.zeros(rows, np.int32))


def generate_ids(llama, prompts: Sequence[Sequence[int]], params: SamplingParams, *, decode_steps: int = 32,
                 speculative=None, report: dict | None = None) -> Iterator[list[list[int]]]:
    """`Llama.generate`'s drive of an engine of its own: yields, step by step, the new tokens of each
    prompt (lists, possibly empty); stop tokens included. The pool holds every prompt and its new
    tokens (so nothing is preempted), less what prompts share. Prompts are checked already. When
    speculating, `report` receives the proposals' figures at the end."""
    longest = max(len(p) for p in prompts) + params.max_new_tokens
    bs = DEFAULT_BLOCK_SIZE
    blocks = sum(-(-(len(p) + params.max_new_tokens) // bs) for p in prompts)
    # The pool's size is a program's shape: a power of two of blocks (the null block included).
    blocks = bucket(blocks + 1, minimum=MIN_TABLE_WIDTH) - 1
    engine = Engine(llama, max_batch=len(prompts), max_seq_len=longest, decode_steps=decode_steps,
                    kv_cache_tokens=blocks * bs, speculative=speculative)
    new: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):
        engine.add(Request(tuple(p), params), lambda out, i=i: new[i].extend(out.token_ids))
    while engine.has_work():  # errors raise to the caller: there is no request to fail
        for phase in (engine.prefill_step, engine.decode_step):
            phase()
            yield [list(row) for row in new]
            for row in new:
                row.clear()
    if report is not None and engine.speculative is not None:
        p, a, n = engine.spec_proposed, engine.spec_accepted, engine.spec_steps
        report["speculative"] = {"proposed_tokens": p, "accepted_tokens": a,
                                 "acceptance_rate": a / p if p else None, "accepted_per_step": a / n if n else None}


def default_kv_cache_tokens(llama, draft=None) -> int:
    """Tokens of KV cache the pool holds by default: CPU_KV_CACHE_BYTES on a CPU; on a GPU,
    GPU_KV_CACHE_SHARE of the memory the weights leave free (on the least free device). With a
    draft model (speculation) a token's bytes are its keys and values in both pools."""
    tp = 1 if llama.mesh is None else sharding.axis_size("kv_heads", llama.mesh)
    per_token = sum(2 * m.config.n_layers * m.config.n_kv_heads * m.config.head_dim
                    * jnp.dtype(m.runtime.dtype).itemsize for m in (llama, draft) if m is not None) // tp
    devices = jax.devices() if llama.mesh is None else list(llama.mesh.devices.flat)
    stats = [d.memory_stats() for d in devices] if devices[0].platform == "gpu" else []
    if stats and all(s and "bytes_limit" in s for s in stats):
        free = min(s["bytes_limit"] - s["bytes_in_use"] for s in stats)
        return max(0, int(free * GPU_KV_CACHE_SHARE)) // per_token
    return CPU_KV_CACHE_BYTES // per_token


class EngineThread:
    """An Engine on a thread of its own, for the server: requests arrive from any thread
    (`submit`), wait in a queue of at most max_queue beyond the running ones, and run as the
    engine steps. The scheduler's policy decides when each starts."""

    def __init__(self, engine: Engine, *, max_queue: int = 64):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.engine, self.max_queue = engine, max_queue
        self.max_seq_len = engine.max_seq_len
        self._inbox: collections.deque[Handle] = collections.deque()
        self._cond = threading.Condition()
        engine._wake = self._notify
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: str | None = None  # why the loop died, if it did

    def make_request(self, prompt, **kwargs) -> Request:
        return self.engine.make_request(prompt, **kwargs)

    def submit(self, request: Request, on_output: Callable[[Output], None]) -> Handle:
        """Queues a request; its Outputs go to `on_output` (called on the engine's thread). Raises
        QueueFull when max_queue requests wait already, NotRunning when stopped."""
        with self._cond:
            if self._stopping or (self._thread is not None and not self._thread.is_alive()):
                raise NotRunning(self.error or "the engine is stopped")
            load = self.engine.load()
            waiting = len(self._inbox) + load["waiting"]
            if waiting >= self.max_queue + max(0, self.engine.max_batch - load["running"]):
                with self.engine.stats_lock:
                    self.engine._stats.rejected += 1
                raise QueueFull(f"{waiting} requests are waiting")
            h = Handle(self.engine, request, on_output)
            self._inbox.append(h)
            self._cond.notify()
        return h

    @property
    def running(self) -> bool:
        """Whether the thread is serving (False before `start`, after `stop` or a crash)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def start(self) -> "EngineThread":
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llama-jax-engine", daemon=True)
                self._thread.start()
        return self

    def stop(self, timeout: float | None = 30) -> None:
        """Stops the thread; requests in flight or waiting finish as "cancelled"."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._drain(None)

    def load(self) -> dict:
        with self._cond:
            load = self.engine.load()
            load["waiting"] += len(self._inbox)
            return load

    def stats(self) -> Stats:
        return self.engine.stats()

    def warmup(self) -> dict[str, int]:
        if self.running:
            raise RuntimeError("warmup runs before start")
        return self.engine.warmup()

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._stopping or self._inbox or self.engine.has_work())
                    if self._stopping:
                        break
                    while self._inbox:
                        self.engine._enqueue(self._inbox.popleft())
                self.engine.step()
        except BaseException as e:  # noqa: BLE001
            self.error = f"engine died: {type(e).__name__}: {e}"
            log.exception("engine died")
        finally:
            with self._cond:
                self._stopping = True
            self._drain(self.error)

    def _drain(self, error: str | None) -> None:
        with self._cond:
            inbox, self._inbox = list(self._inbox), collections.deque()
        for h in inbox + list(self.engine.handles.values()):
            self.engine._finish(h, "cancelled" if error is None else "error", error=error)
