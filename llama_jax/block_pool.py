"""The KV cache's block pool on the host: which blocks are free, who holds each, and the prefix cache.

The cache on the device is a pool of fixed-size blocks ([P, block_size, K, E] per layer); a sequence
holds a list of block ids, its block table. This module owns only the bookkeeping, in Python, as
vLLM's KVCacheManager does: the device never sees it except as block tables.

- Block 0 is the null block: never handed out. Table entries past a sequence's blocks, and the rows
  of a batch that hold no sequence, point at it, so their (garbage) writes land where nobody reads.
- A block is referenced by every sequence whose table holds it; it returns to the pool when the last
  one lets go.
- Prefix caching: a full block's key is a hash of (its parent block's key, its tokens), so equal keys
  mean equal prefixes. A sequence registers a block's key as soon as its tokens are known (a prompt's
  blocks, at admission), marked pending until its keys and values are computed; a newcomer whose
  prefix runs into a pending block waits for it instead of computing it a second time. A ready block
  nobody references stays cached, evictable in least-recently-used order; a pending one is dropped.
  A cached block also keeps its parent key and tokens, checked on every hit, so a hash collision is
  a miss, not a wrong answer.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence

NULL_BLOCK = 0


@dataclasses.dataclass
class _Cached:
    block: int
    parent: int | None
    tokens: tuple[int, ...]
    ready: bool


def block_keys(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """The keys of the full blocks of `tokens` (a sequence's tokens from its start), in order."""
    keys = []
    for i in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[i:i + block_size])))
        keys.append(parent)
    return keys


class BlockPool:
    """num_blocks blocks of block_size tokens (block 0 the null block, so num_blocks - 1 usable).
    prefix_caching: keep and reuse full blocks by key (else every block is private)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True):
        if num_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (one is the null block), got {num_blocks}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self._free = collections.deque(range(1, num_blocks))  # hold nothing
        self._refs = [0] * num_blocks
        self._key: list[int | None] = [None] * num_blocks  # a cached block's key
        self._cached: dict[int, _Cached] = {}  # key -> block
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # ready, unreferenced; LRU first

    @property
    def usable(self) -> int:
        """Blocks a sequence can hold (all but the null block)."""
        return self.num_blocks - 1

    def available(self) -> int:
        """Blocks `allocate` can hand out now (free, or cached and evictable)."""
        return len(self._free) + len(self._evictable)

    def used(self) -> int:
        """Blocks some sequence holds."""
        return self.usable - self.available()

    def allocate(self, n: int) -> list[int] | None:
        """n blocks, each referenced once; None (and nothing taken) when fewer are available. Free
        blocks go first, then the least recently used cached ones (forgetting their keys)."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                del self._cached[self._key[b]]
                self._key[b] = None
            self._refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Lets go of each block once. Give them tail first: the tail of a sequence is evicted
        before its prefix, which others are likelier to share."""
        for b in blocks:
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            key = self._key[b]
            if key is not None and self._cached[key].ready:
                self._evictable[b] = None
            else:
                if key is not None:  # never computed: nobody can use it
                    del self._cached[key]
                    self._key[b] = None
                self._free.append(b)

    def match(self, keys: Sequence[int], tokens: Sequence[int], parent: int | None = None) -> tuple[list[int], bool]:
        """The cached blocks of the longest prefix of `keys` (full blocks of `tokens`, the first
        keyed under `parent`), each now referenced once more, and whether the prefix stopped at a
        block that is still pending (being computed by another sequence: worth waiting for)."""
        out: list[int] = []
        if not self.prefix_caching:
            return out, False
        bs = self.block_size
        for i, key in enumerate(keys):
            c = self._cached.get(key)
            if c is None or c.parent != parent or c.tokens != tuple(tokens[i * bs:(i + 1) * bs]):
                break
            if not c.ready:
                return [], True
            out.append(c.block)
            parent = key
        for b in out:
            self._refs[b] += 1
            self._evictable.pop(b, None)
        return out, False

    def register(self, block: int, key: int, parent: int | None, tokens: Sequence[int], *, ready: bool) -> None:
        """Caches a held block under `key` (its tokens full: a hash of the parent's key and them);
        pending until `mark_ready` unless `ready`. A key cached already keeps its block (this one
        stays private)."""
        if not self.prefix_caching or key in self._cached or self._key[block] is not None:
            return
        self._cached[key] = _Cached(block, parent, tuple(tokens), ready)
        self._key[block] = key

    def mark_ready(self, block: int) -> None:
        """The block's keys and values are computed: others may now share it."""
        key = self._key[block]
        if key is not None:
            self._cached[key].ready = True

    def reset_prefix_cache(self) -> None:
        """Forgets every cached key (blocks in use stay with their sequences)."""
        for b in list(self._evictable):
            self._free.append(b)
        self._evictable.clear()
        self._cached.clear()
        self._key = [None] * self.num_blocks
