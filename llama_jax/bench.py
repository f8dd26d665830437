"""Timing of prefill and decode for a loaded model (used by `llama-jax bench` and benchmarks/)."""

from __future__ import annotations

import statistics
import time

import numpy as np


def time_generate(model, *, prompt_len: int = 16, new_tokens: int = 64, batch: int = 1, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Greedy generation of `new_tokens` after a random `prompt_len`-token prompt, with no stop token.
    Returns medians over `repeats` runs after one warm-up (compile) run: prefill seconds (time to the
    first token), decode tokens/s per sequence, and the warm-up's seconds."""
    rng = np.random.RandomState(seed)
    vocab = model.config.vocab_size
    prompts = [rng.randint(3, vocab, prompt_len).tolist() for _ in range(batch)]
    t0 = time.perf_counter()
    model.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])
    warmup = time.perf_counter() - t0
    ttfts, rates = [], []
    for _ in range(repeats):
        ttft, total = _timed(model, prompts, new_tokens)
        ttfts.append(ttft)
        rates.append((new_tokens - 1) / (total - ttft))
    return {"prefill_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates), "warmup_s": warmup}


def _timed(model, prompts, new_tokens):
    """Seconds to the first token and to the last, streaming through the chunked decode loop."""
    from llama_jax import generate as gen

    params = model._sampling(new_tokens, 0.0, None, None, 0, [])
    t0 = time.perf_counter()
    it = gen.generate_ids(model, prompts, params)
    next(it)
    ttft = time.perf_counter() - t0
    for _ in it:
        pass
    return ttft, time.perf_counter() - t0
