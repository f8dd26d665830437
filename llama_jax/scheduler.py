"""The engine's scheduler: policy only. Which sequences run, which prompt tokens are prefilled in a
step, who gives back blocks when the KV pool runs out. It owns the host side of the cache
(llama_jax.block_pool) and never touches the device: llama_jax.engine runs what it plans.

- Admission, first come first served: a waiting sequence starts when fewer than max_batch run and
  the pool has blocks for all its known tokens, less those the prefix cache holds already. A
  sequence whose prefix runs into blocks another one is computing now waits a step for them.
- Chunked prefill: each step prefills a chunk of the oldest unprefilled sequences, at most
  `chunk` tokens together (rows x chunk length, padded to powers of two), between the decode
  calls of the others, which so wait at most one chunk, not a whole prompt.
- Decode: before each decode call every decoding sequence gets the blocks its next `steps`
  tokens need. When the pool runs out, the newest running sequence is preempted: it gives back its
  blocks and waits at the head of the queue, to be recomputed (vLLM's recompute preemption; its
  full blocks usually stay cached, so it often recomputes little).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

from llama_jax.block_pool import BlockPool, block_keys
from llama_jax.requests import SamplingParams


def bucket(n: int, minimum: int = 16) -> int:
    """The padded size for n: the next power of two, at least `minimum`."""
    return max(minimum, 1 << (int(n) - 1).bit_length())


def chunk_rows(seqs: list, left: list[int], chunk: int) -> list[tuple]:
    """A chunk's rows: (sequence, tokens it computes), the first sequences in order with tokens
    `left` to compute, as many as fit rows x bucketed chunk length within `chunk` tokens."""
    rows, c = [], 0
    for seq, n in zip(seqs, left):
        wider = max(c, min(bucket(n), chunk))
        if rows and bucket(len(rows) + 1, minimum=1) * wider > chunk:
            break
        rows.append((seq, n))
        c = wider
    return [(seq, min(c, n)) for seq, n in rows]


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens and its place in the cache."""

    prompt: tuple[int, ...]
    params: SamplingParams
    tokens: list[int] = dataclasses.field(default_factory=list)  # the prompt, then each new token
    blocks: list[int] = dataclasses.field(default_factory=list)  # its block table
    keys: list[int] = dataclasses.field(default_factory=list)  # prefix-cache keys of its full blocks
    computed: int = 0  # leading tokens whose keys and values are in the cache
    draft_computed: int = 0  # speculation's draft model: the same, in its own pool
    prefilled: bool = False  # every known token computed and the next one sampled: decoding
    cached_tokens: int = 0  # prompt tokens the prefix cache held when it was first admitted
    spec_misses: int = 0  # speculation: verifies in a row that kept none of its proposals
    spec_resume: int = 0  # speculation: it proposes again once it holds this many tokens
    adapter: int = 0  # the LoRA adapter its products apply (llama_jax.lora.bank's index; 0: none)
    id: int = dataclasses.field(default_factory=itertools.count().__next__)  # arrival order

    def __post_init__(self):
        self.tokens = list(self.prompt)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt):]

    @property
    def root(self) -> int | None:
        """The parent key of its first block: keys and values depend on the adapter, so the prefix
        cache keys each adapter's blocks apart (the base's as they always were)."""
        return None if self.adapter == 0 else hash(("lora", self.adapter))


class Scheduler:
    """max_batch: most sequences running (prefilling or decoding) at once; chunk: prompt tokens per
    step; pool: the KV blocks."""

    def __init__(self, pool: BlockPool, *, max_batch: int, chunk: int):
        self.pool, self.max_batch, self.chunk = pool, max_batch, chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in arrival order
        self.preemptions = 0
        self.prefix_hit_tokens = 0  # prompt tokens found in the prefix cache, all admissions

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.pool.block_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a finished or cancelled sequence out, giving back its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks[::-1])  # tail first: the prefix stays cached longest
        seq.blocks, seq.keys, seq.computed, seq.prefilled, seq.draft_computed = [], [], 0, False, 0

    # --- Prefill ---

    def schedule_prefill(self) -> list[tuple[Sequence, int]]:
        """Admits what fits, then picks the prefill rows of this step: (sequence, tokens from
        seq.computed on), oldest first, rows x bucketed chunk length within `chunk`."""
        self._admit()
        todo = [seq for seq in self.running if not seq.prefilled]
        return chunk_rows(todo, [len(seq.tokens) - seq.computed for seq in todo], self.chunk)

    def _admit(self) -> None:
        pool = self.pool
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            # Full blocks before the last token: at least one token is computed, for its logits.
            keys = block_keys(seq.tokens[:-1], pool.block_size, parent=seq.root)
            hit, pending = pool.match(keys, seq.tokens, parent=seq.root)
            if pending:
                return
            need = self.blocks_for(len(seq.tokens)) - len(hit)
            new = pool.allocate(need)
            if new is None:
                pool.release(hit[::-1])
                return
            self.waiting.popleft()
            seq.blocks, seq.computed = hit + new, len(hit) * pool.block_size
            if not seq.generated:  # a first admission, not a preempted sequence's return
                seq.cached_tokens = seq.computed
                self.prefix_hit_tokens += seq.computed
            # Every full block of the known tokens is cached now, pending until computed.
            seq.keys = block_keys(seq.tokens, pool.block_size, parent=seq.root)
            self._register(seq, len(hit), ready=False)
            self.running.append(seq)
        self.running.sort(key=lambda s: s.id)

    def _register(self, seq: Sequence, first: int, *, ready: bool) -> None:
        bs = self.pool.block_size
        for i in range(first, len(seq.keys)):
            parent = seq.keys[i - 1] if i else seq.root
            self.pool.register(seq.blocks[i], seq.keys[i], parent, seq.tokens[i * bs:(i + 1) * bs], ready=ready)

    def computed(self, seq: Sequence, n: int) -> None:
        """n more tokens of seq have their keys and values in the cache: its full blocks among them
        become shareable (a decode's new full blocks are cached here too)."""
        bs = self.pool.block_size
        before = seq.computed // bs
        seq.computed += n
        full = seq.computed // bs
        known = len(seq.keys)
        if known < full:  # blocks filled by decoding: keyed from the last known one on
            seq.keys += block_keys(seq.tokens[known * bs:full * bs], bs, parent=seq.keys[-1] if known else seq.root)
            self._register(seq, known, ready=True)
        for i in range(before, full):
            self.pool.mark_ready(seq.blocks[i])

    # --- Decode ---

    def schedule_decode(self, steps: int) -> list[Sequence]:
        """The decoding sequences, each with blocks for min(steps, tokens it may still make) more
        tokens, preempting the newest running sequences while the pool is short."""
        for seq in [s for s in self.running if s.prefilled]:
            if seq not in self.running:  # preempted for an older one
                continue
            steps_left = min(steps, seq.params.max_new_tokens - len(seq.generated))
            need = self.blocks_for(len(seq.tokens) - 1 + steps_left) - len(seq.blocks)
            while need > self.pool.available():
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                if need > 0:
                    seq.blocks += self.pool.allocate(need)
        return [s for s in self.running if s.prefilled]

    def preempt(self, seq: Sequence) -> None:
        """seq gives back its blocks and waits first in line, to be recomputed from its tokens."""
        self.running.remove(seq)
        self._release(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1
