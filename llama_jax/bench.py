"""Timing of prefill and decode for a loaded model (used by `llama-jax bench` and benchmarks/)."""

from __future__ import annotations

import statistics
import time

import numpy as np


def time_generate(model, *, prompt_len: int = 16, new_tokens: int = 64, batch: int = 1, repeats: int = 3,
                  seed: int = 0) -> dict:
    """Greedy generation of `new_tokens` after a random `prompt_len`-token prompt, with no stop token.
    Returns medians over `repeats` runs after one warm-up (compile) run: prefill seconds (time to the
    first token), decode tokens/s per sequence, and the warm-up's seconds; with speculation, the
    last run's `speculative` figures (llama_jax.engine.generate_ids)."""
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
    return {"prefill_s": statistics.median(ttfts), "decode_tok_s": statistics.median(rates), "warmup_s": warmup,
            "speculative": t.get("speculative")}


def read_bandwidth(nbytes: int = 512 * 2**20, repeats: int = 5) -> float:
    """Bytes per second that a jitted float32 matrix-vector product reads on the default device (the
    median of `repeats`): what a decode step, which reads every weight once, can at best move."""
    import jax
    import jax.numpy as jnp

    n = int((nbytes // 4) ** 0.5)
    w = jnp.ones((n, n), jnp.float32)
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda w, x: w @ x)
    f(w, x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        f(w, x).block_until_ready()
        times.append(time.perf_counter() - t)
    return w.nbytes / statistics.median(times)


def decode_bytes_per_token(model, context: int) -> int:
    """Bytes one decode step must read for one sequence: every weight once (the embedding table once,
    as the output head or through the lookup of one row) and the keys and values of `context` tokens."""
    import jax

    c = model.config
    weights = sum(x.nbytes for x in jax.tree.leaves(model.state))
    if not c.tie_embeddings:  # the input embedding is a lookup of one row, not a read of the table
        emb = sum(x.nbytes for x in jax.tree.leaves(model.state["tok_embeddings"]))  # a QArray's parts too
        weights -= emb - emb // c.vocab_size
    kv = 2 * c.n_layers * context * c.n_kv_heads * c.head_dim * np.dtype(model.runtime.dtype).itemsize
    return weights + kv
