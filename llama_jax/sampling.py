"""The sampler: one token per row, each row with its own temperature, top-k, top-p and random
stream. Generation (llama_jax.generate) and the serving engine (llama_jax.scheduler) both draw
with it, so a request's tokens depend only on its prompt, parameters and seed."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Alternatives computed for each token when a row asks for log-probabilities (OpenAI's maximum
# top_logprobs): one fixed shape, so no request's count recompiles a program.
TOP_LOGPROBS = 20


class Logprobs(NamedTuple):
    """Log-probabilities of the distribution each row drew from (leading axes: the rows, and the
    steps where a program makes several): the drawn token's, and the TOP_LOGPROBS best tokens'."""

    token: jax.Array  # float32 [...]
    top_ids: jax.Array  # int32 [..., TOP_LOGPROBS], best first
    top: jax.Array  # float32 [..., TOP_LOGPROBS]


def allowed_tokens(bitmask, vocab_size: int):
    """A grammar's bitmask [B, ceil(V / 32)] int32 (bit j of word i allows token 32 i + j, xgrammar's
    layout) as booleans [B, V]."""
    bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # (B, W, 32)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def sample(logits, seeds, counts, temperature, top_p, top_k, *, allowed=None, logprobs: bool = False):
    """One token per row of logits [B, V] (float32), each row with its own parameters [B]:
    temperature 0 is greedy, top_k 0 and top_p 1 keep the whole vocabulary (top-k, then top-p).
    Row b draws with fold_in(key(seeds[b]), counts[b]), counts being the tokens its request has so
    far (0 for the first), so a request samples the same tokens alone or in any batch, through
    `Llama.generate` or the server. When every row is greedy nothing is drawn, and when no row
    filters the vocabulary nothing is sorted (lax.cond runs one branch).

    allowed: a grammar bitmask per row [B, ceil(V / 32)] int32 (all bits set: no constraint); tokens
    it leaves out get no probability. logprobs: also return `Logprobs` of the distribution each row
    drew from: for a sampled row the one after temperature, top-k and top-p; for a greedy row the
    model's own (temperature 1, unfiltered); both after the grammar mask. Returns tokens [B] int32,
    or (tokens, Logprobs)."""
    if allowed is not None:
        logits = jnp.where(allowed_tokens(allowed, logits.shape[-1]), logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled = temperature > 0

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

    def drawn_from(x):  # what a sampled row draws from
        x = x / jnp.where(sampled, temperature, 1.0)[:, None]
        return jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)), keep, lambda x: x, x)

    def draw(x):
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counts)
        drawn = jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)
        return jnp.where(sampled, drawn, greedy)

    if not logprobs:
        return jax.lax.cond(jnp.any(sampled), lambda x: draw(drawn_from(x)), lambda _: greedy, logits)
    x = jax.lax.cond(jnp.any(sampled), drawn_from, lambda x: x, logits)
    token = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, x)
    logp = jax.nn.log_softmax(jnp.where(sampled[:, None], x, logits), axis=-1)
    top, top_ids = jax.lax.top_k(logp, TOP_LOGPROBS)
    chosen = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    return token, Logprobs(chosen, top_ids.astype(jnp.int32), top)
