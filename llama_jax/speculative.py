"""Speculative decoding's proposals and settings (the engine verifies them: llama_jax.engine).

`ngram` (prompt lookup, vLLM's name): the longest recent n-gram of a sequence (n from
prompt_lookup_max down to prompt_lookup_min) that occurred earlier in its prompt or output proposes
the tokens that followed its latest earlier occurrence. No second model; it wins where the output
repeats the input (editing, summarizing, code).

Exactness: the engine's verify program samples, after each proposed position, the token a decode
step would sample there (row token number n drawn with fold_in(key(seed), n), llama_jax.sampling),
and keeps the proposals up to the first that differs, plus that sampled token. So speculation
changes how many tokens a forward makes, never which: greedy and sampled outputs are the same
tokens as without it, for the same seed. For a proposal that does not depend on the random stream
(n-gram lookup), a proposed token is kept with the target's own probability of it, as the
rejection-sampling rule of Leviathan et al. would keep it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

METHODS = ("ngram",)


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate: method ("ngram"), tokens proposed per step, and the n-gram sizes tried."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method: {self.method!r} is not one of {', '.join(METHODS)} "
                             "(a draft model is not built yet)")
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"speculative {name}: must be a positive integer, got {value!r}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative prompt_lookup_min ({self.prompt_lookup_min}) exceeds prompt_lookup_max "
                             f"({self.prompt_lookup_max})")

    @classmethod
    def of(cls, value) -> "SpeculativeConfig | None":
        """None, a SpeculativeConfig, or a dict with vLLM's names ({"method": "ngram",
        "num_speculative_tokens": 4, ...}); unknown keys are refused, naming them."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"speculative: a dict such as {{'method': 'ngram'}}, got {value!r}")
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"speculative: unknown setting {unknown[0]!r}")
        return cls(**value)


def propose_ngram(tokens: Sequence[int], k: int, n_max: int, n_min: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest n-gram ending
    `tokens` (n from n_max down to n_min); [] when none occurred."""
    arr = np.asarray(tokens, np.int64)
    for n in range(min(n_max, len(arr) - 1), n_min - 1, -1):
        windows = np.lib.stride_tricks.sliding_window_view(arr[:-1], n)  # every n-gram but the last
        hits = np.flatnonzero((windows == arr[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return [int(t) for t in arr[start:start + k]]
    return []
