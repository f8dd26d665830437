"""The model runner: the engine's jitted programs over a paged KV cache, and the pool they update.

Three programs, all over the pool of KV blocks (llama_jax.block_pool) and rows of sequences, each row
with its block table:
- `prefill`: a chunk of each row's tokens (row r's at positions start[r]...) into the cache, then a
  token sampled from each row's last chunk position (used where that position is the row's last
  known token; the others' are discarded, which costs one head product per row);
- `decode`: up to `steps` decode steps of every row in a `lax.while_loop`, stopping early once every
  row has stopped; a row stops at a stop id or at its max_new tokens;
- `verify` (speculative decoding): each row's last token and its proposed next tokens in one
  forward, and the token sampled after each of them.
Shapes are bucketed (rows, chunk and table width to powers of two) and every per-row value is an
array, so a program is compiled once per bucket and never per request. Sampling is
llama_jax.sampling's one scheme: row r's token number n comes from fold_in(key(seed[r]), n).

LoRA adapters served at once (`Llama.adapter_bank`) are one more argument of each program, the
banks and each row's adapter id [R] (0: the base): a row's products add its adapter's gathered
A and B (llama_jax.lora.wrap_rows), so any mix of adapters runs in one program. Without adapters
the argument is absent and the programs are the base model's.

Two options make other programs, compiled when first asked for, and leave these as they are:
`logprobs` (each token's log-probabilities come back too) and grammar masks (llama_jax.structured):
a prefill takes its rows' masks as an argument; a decode takes the first step's, and inside its loop
asks the host for each next step's (an io_callback that advances the rows' matchers).
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.experimental import io_callback

from llama_jax import lora, sampling, sharding, structured
from llama_jax import model as model_lib

MAX_STOP_IDS = 16  # stop token ids per request (eos included): a fixed [B, 16] array on the device

# Traces of each program so far (every runner of this process together): a trace is a new program to
# compile (or to fetch from JAX's persistent cache).
TRACES: collections.Counter = collections.Counter()


def _counted(fn):
    @functools.wraps(fn)
    def traced(*args, **kwargs):
        TRACES[fn.__name__] += 1
        return fn(*args, **kwargs)
    return traced


class Sampling(NamedTuple):
    """Each row's sampling: [B] arrays, so that no setting recompiles."""

    seed: np.ndarray  # uint32
    temperature: np.ndarray  # float32, 0: greedy
    top_p: np.ndarray  # float32, 1: off
    top_k: np.ndarray  # int32, 0: off


class GrammarCall(NamedTuple):
    """A decode call's grammar masks: the first step's [B, W] int32 (every bit set for a row without
    a grammar), and the id its matchers are registered under (llama_jax.structured.registered)."""

    first: np.ndarray
    call: np.ndarray  # int32 scalar


class Rows(NamedTuple):
    """What a decode call needs of each row, [B] arrays (host numpy, built by the engine)."""

    token: np.ndarray  # int32: the last token, fed to the next step
    pos: np.ndarray  # int32: where `token` goes in the cache
    count: np.ndarray  # int32: tokens generated so far
    max_new: np.ndarray  # int32
    stop_ids: np.ndarray  # int32 [B, MAX_STOP_IDS], padded with -1
    live: np.ndarray  # bool: a sequence (else a padding row: it writes to the null block)
    sampling: Sampling


def _model(graphdef, state, adapters):
    """The model; with adapters (banks viewed as the model's layout, row ids [R]), each adapted
    weight applying row r's adapter to row r."""
    model = model_lib.merge(graphdef, state)
    if adapters is None:
        return model
    banks, rows = adapters
    params = lora.wrap_rows(nnx.to_pure_dict(state), banks, rows, model.layout, model.config)
    state = jax.tree.map(lambda x: x, state)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, params)
    return model_lib.merge(graphdef, state)


def _chunk(model, pool, tokens, start, table):
    """The hidden states [R, C, D] of tokens [R, C] at positions start[r]..., written into the pool
    through table [R, W] as they go, and the pool."""
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]  # (R, C)
    return model.hidden(tokens, positions, cache=pool, block_table=table)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("logprobs",), donate_argnums=(2,))
@_counted
def prefill(graphdef, state, pool, tokens, start, table, last, count, s: Sampling, allowed=None, *,
            logprobs: bool = False, adapters=None):
    """tokens [R, C] of each row at positions start[r]... into the cache through table [R, W], and
    a token sampled (as the row's token number count[r]) from the hidden state at chunk index
    last[r], within the grammar masks `allowed` [R, ceil(V / 32)] when given. Returns (pool,
    tokens [R], sampling.Logprobs [R, ...] or None). adapters: (banks, row ids [R]) or None."""
    model = _model(graphdef, state, adapters)
    x, pool = _chunk(model, pool, tokens, start, table)
    x_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]  # (R, D)
    out = sampling.sample(model.head(x_last), s.seed, count, s.temperature, s.top_p, s.top_k, allowed=allowed,
                          logprobs=logprobs)
    token, lp = out if logprobs else (out, None)
    return pool, sharding.replicated(token), sharding.replicated(lp)


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(2,))
@_counted
def verify(graphdef, state, pool, tokens, start, table, count, s: Sampling, *, adapters=None):
    """Speculative decoding's check: each row's last token and its proposed next ones, tokens
    [R, C], at positions start[r]... into the cache through table [R, W], and the token the model
    samples after each position, as the row's token number count[r] + i: the same draw a decode
    step would make there. Returns (pool, tokens [R, C])."""
    model = _model(graphdef, state, adapters)
    r, c = tokens.shape
    x, pool = _chunk(model, pool, tokens, start, table)
    logits = model.head(x).reshape(r * c, -1)
    counts = (count[:, None] + jnp.arange(c, dtype=jnp.int32)[None]).reshape(-1)
    each = lambda a: jnp.repeat(a, c)  # noqa: E731  a row's parameters at each of its positions
    out = sampling.sample(logits, each(s.seed), counts, each(s.temperature), each(s.top_p), each(s.top_k))
    return pool, sharding.replicated(out.reshape(r, c))


@functools.partial(jax.jit, static_argnums=(0, 3), static_argnames=("logprobs",), donate_argnums=(2,))
@_counted
def decode(graphdef, state, pool, steps: int, r: Rows, table, grammar: GrammarCall | None = None, *,
           logprobs: bool = False, adapters=None):
    """Up to `steps` decode steps of every row (table [B, W] fixed over them: the engine gives each
    row the blocks for `steps` more tokens), stopping early once no live row is going; with
    `grammar`, each step's tokens within its rows' masks. Returns (pool, tokens [B, steps] with -1
    where a row produced nothing, sampling.Logprobs [B, steps, ...] or None)."""
    model = _model(graphdef, state, adapters)
    s = r.sampling
    b = r.token.shape[0]

    def cond(carry):
        i, done = carry[0], carry[5]
        return (i < steps) & ~jnp.all(done)

    def body(carry):
        i, pool, token, pos, count, done, out, allowed, lps = carry
        logits, pool = model(token[:, None], pos[:, None], pool, block_table=table)
        new = sampling.sample(logits[:, 0], s.seed, count, s.temperature, s.top_p, s.top_k, allowed=allowed,
                              logprobs=logprobs)
        if logprobs:
            new, lp = new
            lps = jax.tree.map(lambda all_, one: all_.at[:, i].set(one), lps, lp)
        going = ~done
        token = jnp.where(going, new, token)
        count = count + going
        stop = jnp.any(token[:, None] == r.stop_ids, axis=-1) | (count >= r.max_new)
        out = out.at[:, i].set(jnp.where(going, token, -1))
        if grammar is not None:  # the host's matchers take this step's tokens and say what may follow
            allowed = io_callback(structured.advance, jax.ShapeDtypeStruct(allowed.shape, jnp.int32),
                                  grammar.call, token, going, ordered=False)
        return i + 1, pool, token, pos + going, count, done | (going & stop), out, allowed, lps

    out = jnp.full((b, steps), -1, jnp.int32)
    lps = None
    if logprobs:
        k = sampling.TOP_LOGPROBS
        lps = sampling.Logprobs(jnp.zeros((b, steps), jnp.float32), jnp.zeros((b, steps, k), jnp.int32),
                                jnp.zeros((b, steps, k), jnp.float32))
    allowed = None if grammar is None else grammar.first
    carry = (0, pool, r.token, r.pos, r.count, ~r.live, out, allowed, lps)
    _, pool, *_, out, _, lps = jax.lax.while_loop(cond, body, carry)
    return pool, sharding.replicated(out), sharding.replicated(lps)


class ModelRunner:
    """The model's programs over one pool of `num_blocks` KV blocks of `block_size` tokens (block 0
    the null block), on the model's mesh (split by KV heads)."""

    def __init__(self, llama, num_blocks: int, block_size: int):
        self.graphdef, self.state, self.mesh = llama.graphdef, llama.state, llama.mesh
        self.config, self.layout, self.dtype = llama.config, llama.layout, jnp.dtype(llama.runtime.dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.pool = self._zeros()
        self.banks = None  # the LoRA banks as the model's layout reads them, on its device(s)
        if llama.adapter_bank is not None:
            banks = lora.view(llama.adapter_bank, llama.layout, llama.config)
            where = (jax.devices()[0] if self.mesh is None
                     else jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))
            self.banks = jax.device_put(banks, where)

    def adapters(self, rows) -> dict:
        """A program's adapter argument for row ids [R] (numpy int32), as keywords: none without banks."""
        return {} if self.banks is None else {"adapters": (self.banks, rows)}

    def _zeros(self):
        with sharding.on_mesh(self.mesh):
            pool = model_lib.page_zeros(self.config, self.layout, self.dtype, self.num_blocks, self.block_size,
                                        sharding.placement(self.mesh))
        # Committed to its device, as every pool a program returns is: an uncommitted first pool
        # would compile each program once more.
        return pool if self.mesh is not None else jax.device_put(pool, jax.devices()[0])

    def reset(self) -> None:
        """A fresh pool (after a failed call: a donated pool may be gone)."""
        self.pool = self._zeros()

    def prefill(self, tokens, start, table, last, count, s: Sampling, allowed=None, *, logprobs: bool = False,
                rows=None):
        """(tokens [R], Logprobs of numpy arrays or None). rows: each row's adapter id [R] (with banks)."""
        with sharding.on_mesh(self.mesh):
            args, kwargs = _options(allowed, logprobs)
            kwargs.update(self.adapters(rows))
            self.pool, token, lp = prefill(self.graphdef, self.state, self.pool, tokens, start, table, last, count,
                                           s, *args, **kwargs)
        return np.asarray(token), _host(lp)

    def verify(self, tokens, start, table, count, s: Sampling, rows=None) -> np.ndarray:
        with sharding.on_mesh(self.mesh):
            self.pool, out = verify(self.graphdef, self.state, self.pool, tokens, start, table, count, s,
                                    **self.adapters(rows))
        return np.asarray(out)

    def decode(self, steps: int, rows: Rows, table, grammar: GrammarCall | None = None, *, logprobs: bool = False,
               adapter_rows=None):
        """(tokens [B, steps], Logprobs of numpy arrays or None). adapter_rows: each row's adapter id [B]."""
        with sharding.on_mesh(self.mesh):
            args, kwargs = _options(grammar, logprobs)
            kwargs.update(self.adapters(adapter_rows))
            self.pool, out, lp = decode(self.graphdef, self.state, self.pool, steps, rows, table, *args, **kwargs)
        return np.asarray(out), _host(lp)

    @staticmethod
    def compiled_programs() -> dict[str, int]:
        """Programs traced so far by each jitted piece (every runner of this process together)."""
        return {name: TRACES[name] for name in ("prefill", "decode", "verify")}


def _options(masks, logprobs: bool) -> tuple[tuple, dict]:
    """The optional arguments of a prefill or decode call, left out where unused: a call without
    them has the signature of Engine.warmup's, and so finds its program traced."""
    return (() if masks is None else (masks,)), ({"logprobs": True} if logprobs else {})


def _host(lp: sampling.Logprobs | None) -> sampling.Logprobs | None:
    return None if lp is None else sampling.Logprobs(*(np.asarray(a) for a in lp))
