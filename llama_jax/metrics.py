"""What the serving engine counts and /metrics exports (llama_jax.server writes it as Prometheus text)."""

from __future__ import annotations

import collections
import dataclasses
import itertools
from typing import Sequence


class Histogram:
    """Counts of observations at or under each bound (Prometheus' cumulative buckets), sum, count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last: above every bound (+Inf)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[int]:
        return list(itertools.accumulate(self.counts))


@dataclasses.dataclass
class Stats:
    """What /metrics shows: counters since start, and histograms of finished requests."""

    requests: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # by finish reason
    prompt_tokens: int = 0
    generation_tokens: int = 0
    rejected: int = 0  # queue full
    preemptions: int = 0  # running sequences that gave back their KV blocks, to be recomputed
    prefix_cache_hit_tokens: int = 0  # prompt tokens found in the prefix cache
    spec_proposed_tokens: int = 0  # speculative decoding: proposed tokens verified
    spec_accepted_tokens: int = 0  # and kept
    time_to_first_token_s: Histogram = dataclasses.field(
        default_factory=lambda: Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)))
    decode_tokens_per_s: Histogram = dataclasses.field(
        default_factory=lambda: Histogram((1, 5, 10, 20, 50, 100, 200, 500, 1000)))
