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
        t = model.generate(prompts, max_new_tokens=new_tokens, stop_token_ids=[])[0].timings
        ttfts.append(t["time_to_first_token_s"])
        rates.append(t["decode_tokens_per_s"] or 0.0)
    return {"prefill_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates), "warmup_s": warmup}
