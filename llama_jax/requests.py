"""What a generation request may ask for, checked once: `Llama` and the server share these.

Each check raises ValueError with a one-line message naming the argument (or prompt) at fault,
before anything is compiled or sent to a device.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from llama_jax.sampling import TOP_LOGPROBS
from llama_jax.structured import schema_text


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How a request's tokens are drawn. json_schema: the text of a JSON schema its answer must
    follow (llama_jax.structured; decoding is constrained, and ends where the JSON does), or, with
    json_or_text, that JSON or any text that does not begin with "{" (a tool call or a plain
    answer); logprobs: None, or the number of best alternatives (0 to TOP_LOGPROBS) to report
    beside each token's own log-probability."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()
    json_schema: str | None = None
    json_or_text: bool = False
    logprobs: int | None = None

    def check(self, vocab_size: int) -> None:
        if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and not 1 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [1, {vocab_size}], got {self.top_k}")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {TOP_LOGPROBS}], got {self.logprobs!r}")
        if self.json_or_text and self.json_schema is None:
            raise ValueError("json_or_text: needs a json_schema")
        if self.json_schema is not None and not self.stop_token_ids:
            raise ValueError("json_schema: a constrained answer ends with a stop token id, and this request has "
                             "none (ignore_eos, or stop_token_ids=[])")


def sampling_params(*, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=0, stop_token_ids=None,
                    vocab_size: int, eos_ids=(), json_schema=None, json_or_text=False, logprobs=None
                    ) -> SamplingParams:
    """Checked SamplingParams; stop_token_ids=None stops on eos_ids, [] on none; json_schema a dict
    (or its JSON text)."""
    stops = tuple(eos_ids) if stop_token_ids is None else tuple(int(i) for i in stop_token_ids)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=top_k,
                            top_p=top_p, seed=int(seed), stop_token_ids=stops,
                            json_schema=None if json_schema is None else schema_text(json_schema),
                            json_or_text=bool(json_or_text), logprobs=logprobs)
    params.check(vocab_size)
    return params


def check_token_ids(token_ids, *, vocab_size: int, max_len: int, what: str = "token_ids") -> np.ndarray:
    """A batch of equal-length lists of ids -> int32 array [B, T], each id in the vocabulary."""
    if not len(token_ids) or any(not len(row) for row in token_ids):
        raise ValueError(f"{what}: empty batch or empty sequence")
    if len({len(row) for row in token_ids}) != 1:
        raise ValueError(f"{what}: sequences must have equal lengths, got {sorted({len(r) for r in token_ids})}")
    ids = np.asarray(token_ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what}: token ids must be integers")
    bad = ids[(ids < 0) | (ids >= vocab_size)]
    if bad.size:
        raise ValueError(f"{what}: token id {int(bad[0])} outside the vocabulary [0, {vocab_size})")
    if ids.shape[1] > max_len:
        raise ValueError(f"{what}: length {ids.shape[1]} exceeds the context ({max_len})")
    return ids.astype(np.int32)


def check_positions(positions, shape: tuple[int, int], *, max_len: int) -> np.ndarray:
    """Explicit positions [B, T] of a batch of that shape (default 0..T-1 per row), each in [0, max_len)."""
    if positions is None:
        return np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape).copy()
    pos = np.asarray(positions)
    if pos.shape != tuple(shape) or not np.issubdtype(pos.dtype, np.integer):
        raise ValueError(f"positions: expected integers of shape {tuple(shape)}, got {pos.dtype} {pos.shape}")
    if pos.size and (pos.min() < 0 or pos.max() >= max_len):
        raise ValueError(f"positions: {int(pos.min())}..{int(pos.max())} outside the context [0, {max_len})")
    return pos.astype(np.int32)


def encode_prompt(prompt, tokenizer) -> list[int]:
    """A prompt (text, or a list of token ids) as ids; text gets the tokenizer's bos when it adds one."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
        ids = tokenizer.encode(prompt)
        if tokenizer.add_bos and tokenizer.bos_id is not None:
            ids = [tokenizer.bos_id] + ids
        return ids
    return [int(i) for i in prompt]


def check_prompts(prompts, *, tokenizer, vocab_size: int, max_len: int, max_new_tokens: int) -> list[list[int]]:
    """A list of prompts -> lists of ids, each non-empty, in the vocabulary, and leaving room for
    max_new_tokens in the context."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        raise ValueError("prompts must be a list of prompts (strings or lists of token ids)")
    if not len(prompts):
        raise ValueError("prompts: empty list")
    ids = [encode_prompt(p, tokenizer) for p in prompts]
    for i, p in enumerate(ids):
        if not p:
            raise ValueError(f"prompts[{i}]: empty prompt")
        check_token_ids([p], vocab_size=vocab_size, max_len=max_len, what=f"prompts[{i}]")
        if len(p) + max_new_tokens > max_len:
            raise ValueError(f"prompts[{i}]: {len(p)} prompt tokens + max_new_tokens {max_new_tokens} "
                             f"exceed the context ({max_len})")
    return ids
