"""Speculative decoding's proposals and settings (the engine verifies them: llama_jax.engine).

`ngram` (prompt lookup, vLLM's name): the longest recent n-gram of a sequence (n from
prompt_lookup_max down to prompt_lookup_min) that occurred earlier in its prompt or output proposes
the tokens that followed its latest earlier occurrence. No second model; it wins where the output
repeats the input (editing, summarizing, code).

`draft`: a smaller model of this architecture with the target's tokenizer (for Llama 3.1 8B,
Llama 3.2 1B) decodes the next tokens itself, over a KV pool of its own that the engine indexes with
the target's block tables. It draws each token with the random stream the target would use there,
so where the two distributions are close their draws coincide and the proposals hold, sampled or
greedy. A trained head (EAGLE, Medusa) would be a third method proposing from the target's hidden
states; the verify step would not change.

Exactness: the engine's verify program samples, after each proposed position, the token a decode
step would sample there (row token number n drawn with fold_in(key(seed), n), llama_jax.sampling),
and keeps the proposals up to the first that differs, plus that sampled token. So speculation
changes how many tokens a forward makes, never which: greedy and sampled outputs are the same
tokens as without it, for the same seed: the output is drawn from exactly the target's
distribution, whatever proposes. For a proposal that does not depend on the random stream (n-gram
lookup), a proposed token is kept with the target's own probability of it, as the rejection-sampling
rule of Leviathan et al. would keep it; a draft drawing with the same stream is kept at least as
often where its distribution is the target's (its own copy keeps everything).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import numpy as np

METHODS = ("ngram", "draft")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """How to speculate: method ("ngram" or "draft"), tokens proposed per step, the n-gram sizes
    tried (ngram), and the draft model (draft: its directory, or a loaded llama_jax.Llama)."""

    method: str = "ngram"
    num_speculative_tokens: int = 4
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 1
    model: Any = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"speculative method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "draft":
            if self.model is None:
                raise ValueError("speculative model: the draft method needs a draft model (a directory)")
            if isinstance(self.model, (str, os.PathLike)) and not os.path.isdir(self.model):
                raise ValueError(f"speculative model: {os.fspath(self.model)}: no such model directory")
        elif self.model is not None:
            raise ValueError(f"speculative model: only the draft method takes a model ({self.method} does not)")
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


def with_draft(config: SpeculativeConfig | None, target) -> SpeculativeConfig | None:
    """config with its draft model loaded, if it names a directory (as the target runs: its dtype,
    mesh and CPU kernels), and checked against the target `llama_jax.Llama`: the same vocabulary, and
    the same tokenizer where both have one. Other configs come back as they are."""
    if config is None or config.method != "draft":
        return config
    from llama_jax import api

    draft = config.model
    if not isinstance(draft, api.Llama):
        draft = api.load(draft, dtype=target.runtime.dtype, mesh=target.mesh, cpu_kernels=target.runtime.cpu_kernels)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(f"speculative model: its vocabulary ({draft.config.vocab_size} tokens) is not the "
                         f"target's ({target.config.vocab_size})")
    if draft.tokenizer is not None and target.tokenizer is not None:
        probe = "Speculative decoding: 1234 tokens, ünïcode, <|eot_id|>."
        if draft.tokenizer.encode(probe) != target.tokenizer.encode(probe):
            raise ValueError("speculative model: its tokenizer is not the target's")
    return dataclasses.replace(config, model=draft)


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
