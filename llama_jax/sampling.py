"""The sampler: one token per row, each row with its own temperature, top-k, top-p and random
stream. Generation (llama_jax.generate) and the serving engine (llama_jax.scheduler) both draw
with it, so a request's tokens depend only on its prompt, parameters and seed."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, seeds, counts, temperature, top_p, top_k):
    """One token per row of logits [B, V] (float32), each row with its own parameters [B]:
    temperature 0 is greedy, top_k 0 and top_p 1 keep the whole vocabulary (top-k, then top-p).
    Row b draws with fold_in(key(seeds[b]), counts[b]), counts being the tokens its request has so
    far (0 for the first), so a request samples the same tokens alone or in any batch, through
    `Llama.generate` or the server. When every row is greedy nothing is drawn, and when no row
    filters the vocabulary nothing is sorted (lax.cond runs one branch)."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def keep(x):  # the top-k, then top-p, filter of each row
        v = x.shape[-1]
        desc = -jnp.sort(-x, axis=-1)  # (B, V), descending
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # (B, 1): the k-th largest
        desc = jnp.where(jnp.arange(v) < k[:, None], desc, -jnp.inf)
        probs = jax.nn.softmax(desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(mass_before < top_p[:, None], desc, jnp.inf), axis=-1, keepdims=True)
        cutoff = jnp.where(top_p[:, None] < 1, cutoff, -jnp.inf)  # top_p 1: no cut, whatever the rounding
        return jnp.where((x < kth) | (x < cutoff), -jnp.inf, x)

    def draw(_):
        x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
        x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), keep, lambda x: x, x)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda _: greedy, None)
