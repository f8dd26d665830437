"""The Llama 3 transformer in Flax NNX, top to bottom in Llama order.

Shape letters: B batch, T query length, S key length, D model dim, H query heads, K kv heads,
G group (H // K), E head dim, F ffn dim, V vocab, L layers.

The parameters have one stored layout: each weight kind stacked over a leading layer axis L (simple
checkpoints, one sharding rule per kind), linear weights [in, out]. A `Layout` is a view of them that
a program reads (per-layer arrays walked by a Python loop, [out, in] weights, q/k/v and w1/w3 fused
into one product each): the model is built for a layout, and `view` / `stored` convert parameter
trees between the stored layout and a view. docs/PERFORMANCE.md has the measurements behind the
views each program uses.

The model knows no mesh: parallelism is applied from outside (llama_jax.pipeline runs the stacked
layers over stages through `hidden`'s `walk`; llama_jax.context_parallel reorders the sequence).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import ops
from llama_jax.quant import QArray, concatenate_out, split_out, transpose as q_transpose
from llama_jax.config import LlamaConfig, RuntimeConfig
from llama_jax.sharding import CACHE_AXES, PAGE_AXES, ROWS, no_mesh


@dataclasses.dataclass(frozen=True)
class Layout:
    """A view of the stored parameters that a program reads, chosen once where it is built.

    per_layer: the layers as a list of per-layer blocks, walked by a Python loop (on a CPU decode
      runs about 1.5x faster than scanning the stacked arrays, which copies each layer's slice);
      False: stacked [L, ...] and scanned (compile time flat in depth).
    transposed: linear weights [out, in] (the layout in which XLA's GPU matrix-vector product reads a
      weight once: docs/GPU_COMPILE.md).
    fused: wq|wk|wv stored as one `wqkv` and w1|w3 as one `w13`, concatenated along their outputs: one
      product each (and one for x's gradient), which the CPU's MKL calls want. Never under a mesh:
      tensor parallelism splits the parts' columns differently.
    """

    per_layer: bool = False
    transposed: bool = False
    fused: bool = False


STORED = Layout()  # the checkpoint layout: stacked, [in, out], unfused


def _param(rngs: nnx.Rngs, shape, axes, dtype, std):
    """A parameter with logical axis names (see llama_jax.sharding); never sharded eagerly here."""
    value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class KVCache(NamedTuple):
    """Keys and values of one layer, [B, S_max, K, E] each, or [L, B, S_max, K, E] when stacked."""

    k: jax.Array
    v: jax.Array


# --- RMSNorm --------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, eps: float, impl: str, dtype, stack: tuple[int, ...] = ()):
        axes = ("layers",) * len(stack) + ("norm",)
        self.weight = nnx.Param(jnp.ones((*stack, dim), dtype), out_sharding=axes, eager_sharding=False)
        self.eps, self.impl = eps, impl

    def __call__(self, x, residual=None):
        """Normalizes x, or with `residual`, normalizes h = x + residual and returns (normed, h)."""
        return ops.rms_norm(x, self.weight[...], residual, eps=self.eps, impl=self.impl)


# --- RoPE -----------------------------------------------------------------------------------------


def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [E // 2] in float32, with Llama 3.1 scaling when the config has it."""
    e = config.head_dim
    # Computed in float64 and rounded once, so no bf16 or f32 drift creeps into the angles.
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, e, 2, dtype=np.float64) / e))
    s = config.rope_scaling
    if s is not None:
        # Llama 3.1 ("rope_type": "llama3"): long wavelengths slowed by `factor`, short ones kept,
        # a smooth blend in between (Meta's reference `apply_scaling`).
        old = s.original_max_position_embeddings
        low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / s.factor,
                            np.where(wavelen < high_wavelen, inv_freq, blended))
    return inv_freq.astype(np.float32)


class Rope(NamedTuple):
    """cos and sin of the angles positions [B, T] * inv_freq [E // 2], each [B, T, 1, E // 2] f32;
    computed once per forward and shared by every layer."""

    cos: jax.Array
    sin: jax.Array


def rope_angles(positions: jax.Array, inv_freq: jax.Array) -> Rope:
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, T, E/2), f32 at any position
    # The barrier keeps cos and sin computed once: left alone, XLA fuses them into every layer's
    # rotation, recomputing them 2 x L times (3% of a CPU prefill in sincos).
    cos, sin = jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))
    return Rope(cos[:, :, None, :], sin[:, :, None, :])  # (B, T, 1, E/2)


def apply_rope(x: jax.Array, rope: Rope) -> jax.Array:
    """Rotates x [B, T, N, E] by the angles of `rope`, split-halves layout (Hugging Face's)."""
    cos, sin = rope
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # (B, T, N, E/2) each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# --- Attention, MLP, block --------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["base", "a", "b", "keys", "rows"],
                   meta_fields=["scale", "dropout", "widths"])
@dataclasses.dataclass(frozen=True)
class Adapted:
    """A frozen linear weight with low-rank adapters (LoRA; llama_jax.lora builds these): its product
    is x base + scale * (dropout(x) a) b. The output has one part per weight the layout fused into
    `base` (q|k|v, gate|up; one part unfused), `widths` wide each; each part has its own a [in, r]
    and b [r, width], or None (no adapter), and its own dropout key (None: no dropout).
    With `rows` [B] int32 (serving many adapters), each part's a [N, in, r] and b [N, r, width] are
    banks of N adapters and row b of x takes adapter rows[b]'s (S-LoRA's gathered products)."""

    base: jax.Array | QArray
    a: tuple
    b: tuple
    keys: tuple
    scale: float
    dropout: float
    widths: tuple[int, ...]
    rows: jax.Array | None = None


def _low_rank(x, w: Adapted, runtime: RuntimeConfig):
    """scale * (dropout(x) a) b of each part, side by side: [B, T, out] f32. The base weight is no
    input here, so differentiating the model never computes its gradient."""
    dtype, cpu = jnp.dtype(runtime.dtype), runtime.cpu_kernels == "on"
    parts = []
    for a, b, key, width in zip(w.a, w.b, w.keys, w.widths):
        if a is None:
            parts.append(jnp.zeros((*x.shape[:-1], width), jnp.float32))
            continue
        if w.rows is not None:  # per row: gather each row's A and B, then one batched product each
            h = jnp.einsum("BTI,BIR->BTR", x, a[w.rows].astype(dtype),
                           preferred_element_type=jnp.float32).astype(dtype)  # (B, T, r)
            parts.append(jnp.einsum("BTR,BRO->BTO", h, b[w.rows].astype(dtype),
                                    preferred_element_type=jnp.float32) * w.scale)
            continue
        xd = x
        if key is not None:  # inverted dropout of the adapter's input, as PEFT's lora_dropout
            keep = jax.random.bernoulli(key, 1.0 - w.dropout, x.shape)
            xd = jnp.where(keep, x / (1.0 - w.dropout), 0).astype(x.dtype)
        h = ops.linear(xd, a.astype(dtype), cpu_kernels=cpu).astype(dtype)  # (B, T, r)
        parts.append(ops.linear(h, b.astype(dtype), cpu_kernels=cpu) * w.scale)
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)


def _linear(x, w, runtime: RuntimeConfig, layout: Layout):
    """x [B, T, in] @ w in the compute dtype, accumulated in f32; w [in, out] ([out, in] when the
    layout is transposed), or a QArray in the same layout, read at its stored width, or either
    `Adapted`."""
    dtype = jnp.dtype(runtime.dtype)
    base = w.base if isinstance(w, Adapted) else w
    base = base if isinstance(base, QArray) else base.astype(dtype)
    y = ops.linear(x, base, transposed=layout.transposed, cpu_kernels=runtime.cpu_kernels == "on",
                   mosaic=runtime.attention_impl == "mosaic")
    if isinstance(w, Adapted):
        y = y + _low_rank(x, w, runtime)
    return y.astype(dtype)


def _weight(rngs, stack, shape, axes, dtype, std, layout: Layout):
    """A linear weight [*stack, in, out] (or [*stack, out, in] in a transposed layout)."""
    lx = ("layers",) * len(stack)
    if layout.transposed:
        shape, axes = shape[::-1], axes[::-1]
    return _param(rngs, (*stack, *shape), (*lx, *axes), dtype, std)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, runtime: RuntimeConfig, layout: Layout, *, rngs: nnx.Rngs,
                 stack: tuple[int, ...] = ()):
        d, h, k, e = config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        pd = jnp.dtype(runtime.param_dtype)
        std = 1.0 / math.sqrt(d)
        if layout.fused:
            self.wqkv = _weight(rngs, stack, (d, (h + 2 * k) * e), ("embed", "fused"), pd, std, layout)
        else:
            self.wq = _weight(rngs, stack, (d, h * e), ("embed", "q_heads"), pd, std, layout)
            self.wk = _weight(rngs, stack, (d, k * e), ("embed", "kv_heads"), pd, std, layout)
            self.wv = _weight(rngs, stack, (d, k * e), ("embed", "kv_heads"), pd, std, layout)
        self.wo = _weight(rngs, stack, (h * e, d), ("q_heads", "embed"), pd, 1.0 / math.sqrt(h * e), layout)
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, e
        self.runtime, self.layout = runtime, layout

    def __call__(self, x, rope: Rope, cache: KVCache | None, segment_ids, positions, block_table=None):
        """x [B, T, D]. Without a cache: causal self-attention over x (within each document when
        segment_ids [B, T] are given). With one: T == 1 is a decode step (each sequence writes at
        positions[b, 0] and reads its first positions[b, 0] + 1 keys); T > 1 is a prefill chunk:
        every row writes its keys at start..start+T-1, start = positions[0, 0], and attends to the
        cached keys before them and to its own (chunked prefill). With a block_table [B, W] the
        cache is a paged pool [P, block_size, K, E] (`_paged`). Returns (out, cache)."""
        b, t, _ = x.shape
        h, kv, e, rt, lt = self.n_heads, self.n_kv_heads, self.head_dim, self.runtime, self.layout
        if lt.fused:
            q, k, v = jnp.split(_linear(x, self.wqkv.get_value(), rt, lt), [h * e, (h + kv) * e], axis=-1)
        else:
            q, k, v = (_linear(x, w.get_value(), rt, lt) for w in (self.wq, self.wk, self.wv))
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # (B, T, H|K, E)

        if cache is None:
            out = ops.prefill_attention(q, k, v, segment_ids=segment_ids, impl=rt.attention_impl,
                                        cpu_kernels=rt.cpu_kernels == "on")
        elif block_table is not None:
            out, cache = self._paged(q, k, v, cache, positions, block_table)
        elif t == 1:
            pos = positions[:, 0]
            batch = jnp.arange(b)
            # In bounds by construction (a cache holds every position it is given); said so, XLA
            # writes the row in place instead of copying the whole cache around the scatter.
            write = dict(mode="promise_in_bounds", unique_indices=True)
            cache = KVCache(cache.k.at[batch, pos].set(k[:, 0].astype(cache.k.dtype), **write),
                            cache.v.at[batch, pos].set(v[:, 0].astype(cache.v.dtype), **write))
            out = ops.decode_attention(q[:, 0], cache.k, cache.v, lengths=pos + 1, impl=rt.attention_impl,
                                       cpu_kernels=rt.cpu_kernels == "on")
            out = out[:, None]  # (B, 1, H, E)
        else:
            start = positions[0, 0]
            cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, 1),
                            jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, 1))
            # Query i sits at key start + i and sees the keys up to it. Right padding needs no mask:
            # a padded key sits after every real query of its row.
            out = ops.prefill_attention(q, cache.k, cache.v, q_offset=start, kv_length=start + t,
                                        impl=rt.attention_impl, cpu_kernels=rt.cpu_kernels == "on")
        out = out.reshape(b, t, h * e)  # (B, T, H*E)
        return _linear(out, self.wo.get_value(), rt, lt), cache

    def _paged(self, q, k, v, cache: KVCache, positions, block_table):
        """Attention over a paged cache (llama_jax.block_pool): token p of row b lives in block
        block_table[b, p // block_size] of the pool, at p % block_size. Each row writes its T new
        keys there, positions[b] (consecutive), then attends through the table (ops.paged_attention:
        row b's query i at key positions[b, 0] + i).
        A position past the table's width writes to the null block 0, as do the table's unused
        entries: the padding of a chunk or of a batch lands where nobody reads."""
        b, t = positions.shape
        bs = cache.k.shape[1]
        w = block_table.shape[1]
        index = positions // bs
        block = jnp.where(index < w, jnp.take_along_axis(block_table, jnp.minimum(index, w - 1), axis=1), 0)
        # Indexed [block, offset] in the pool as it is: through a flattened view, XLA's cost analysis
        # counts the whole pool per write (an H100 decode step read 1.11x its minimum bytes, not 1.01x).
        at = (block.reshape(-1), (positions % bs).reshape(-1))  # (B * T,) each
        write = lambda pool, new: pool.at[at].set(  # noqa: E731
            new.reshape(b * t, *new.shape[2:]).astype(pool.dtype), mode="promise_in_bounds")
        cache = KVCache(write(cache.k, k), write(cache.v, v))
        rt = self.runtime
        out = ops.paged_attention(q, cache.k, cache.v, block_table, start=positions[:, 0], impl=rt.attention_impl,
                                  cpu_kernels=rt.cpu_kernels == "on")
        return out, cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig, runtime: RuntimeConfig, layout: Layout, *, rngs: nnx.Rngs,
                 stack: tuple[int, ...] = ()):
        d, f = config.dim, config.ffn_dim
        pd = jnp.dtype(runtime.param_dtype)
        std = 1.0 / math.sqrt(d)
        if layout.fused:
            self.w13 = _weight(rngs, stack, (d, 2 * f), ("embed", "fused"), pd, std, layout)
        else:
            self.w1 = _weight(rngs, stack, (d, f), ("embed", "ffn"), pd, std, layout)
            self.w3 = _weight(rngs, stack, (d, f), ("embed", "ffn"), pd, std, layout)
        self.w2 = _weight(rngs, stack, (f, d), ("ffn", "embed"), pd, 1.0 / math.sqrt(f), layout)
        self.runtime, self.layout = runtime, layout

    def __call__(self, x):
        rt, lt = self.runtime, self.layout
        if lt.fused:
            gate, up = jnp.split(_linear(x, self.w13.get_value(), rt, lt), 2, axis=-1)
        else:
            gate, up = _linear(x, self.w1.get_value(), rt, lt), _linear(x, self.w3.get_value(), rt, lt)
        return _linear(jax.nn.silu(gate) * up, self.w2.get_value(), rt, lt)


class TransformerBlock(nnx.Module):
    def __init__(self, config: LlamaConfig, runtime: RuntimeConfig, layout: Layout, *, rngs: nnx.Rngs,
                 stack: tuple[int, ...] = ()):
        pd = jnp.dtype(runtime.param_dtype)
        norm = dict(eps=config.norm_eps, impl=runtime.norm_impl, dtype=pd, stack=stack)
        self.attention_norm = RMSNorm(config.dim, **norm)
        self.attention = Attention(config, runtime, layout, rngs=rngs, stack=stack)
        self.ffn_norm = RMSNorm(config.dim, **norm)
        self.feed_forward = FeedForward(config, runtime, layout, rngs=rngs, stack=stack)

    def __call__(self, x, delta, rope, cache, segment_ids, positions, block_table=None):
        """A pre-norm residual block over the stream x + delta, where delta [B, T, D] is the previous
        block's FFN output, not yet added: each residual add is fused into the norm after it, so a
        block reads the stream twice instead of three times. Returns (x, delta, cache)."""
        normed, x = self.attention_norm(delta, x)  # x = x + delta
        h, cache = self.attention(normed, rope, cache, segment_ids, positions, block_table)
        normed, x = self.ffn_norm(h, x)  # x = x + attention(...)
        return x, self.feed_forward(normed), cache


# --- Views of the stored parameters ------------------------------------------------------------------

LINEAR_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "wqkv", "w13")
FUSED = {"attention": ("wqkv", ("wq", "wk", "wv")), "feed_forward": ("w13", ("w1", "w3"))}


def _map_linear(block: dict, fn) -> dict:
    """fn(array) -> array over one block's (or the stacked blocks') linear weights."""
    return {part: {k: fn(w) if k in LINEAR_WEIGHTS else w for k, w in ws.items()} for part, ws in block.items()}


def _block_view(block: dict, layout: Layout) -> dict:
    """One block's weights (or the stacked blocks', [L, ...]) in the stored layout -> in `layout`."""
    block = {part: dict(ws) for part, ws in block.items()}
    if layout.fused:
        for part, (name, names) in FUSED.items():
            ws = block.get(part, {})
            if not any(n in ws for n in names):  # a part of the tree without them (api.load views a few at a time)
                continue
            parts = [ws.pop(n) for n in names]
            ws[name] = (concatenate_out(parts) if isinstance(parts[0], QArray)  # (..., in, out1 + out2 + ...)
                        else jnp.concatenate(parts, axis=-1))
    if layout.transposed:
        block = _map_linear(block, _swap_last)
    return block


def _swap_last(w):
    """w with its last two axes swapped: a numpy view for host arrays (nothing copied until placed)."""
    if isinstance(w, QArray):
        return q_transpose(w)
    return np.swapaxes(w, -1, -2) if isinstance(w, np.ndarray) else jnp.swapaxes(w, -1, -2)


def _block_stored(block: dict, layout: Layout, config: LlamaConfig) -> dict:
    """The inverse of _block_view."""
    if layout.transposed:
        block = _map_linear(block, _swap_last)
    block = {part: dict(ws) for part, ws in block.items()}
    if layout.fused:
        q, kv, f = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.ffn_dim
        sizes = {"attention": (q, q + kv), "feed_forward": (f,)}
        for part, (name, names) in FUSED.items():
            ws = block[part]
            w = ws.pop(name)
            ws.update(zip(names, split_out(w, sizes[part]) if isinstance(w, QArray)
                          else jnp.split(w, sizes[part], axis=-1)))
    return block


def view(params: dict, layout: Layout, config: LlamaConfig) -> dict:
    """The parameters (a nested dict as `nnx.to_pure_dict` gives, in the stored layout) as `layout`
    reads them: the model built for `layout` takes the result. Pure: new arrays where the view
    differs (numpy inputs give numpy views, no copy, where only slicing and transposing)."""
    layers = params["layers"]
    if layout.per_layer:
        layers = {i: _block_view(jax.tree.map(lambda w: w[i], layers), layout) for i in range(config.n_layers)}
    else:
        layers = _block_view(layers, layout)
    return dict(params, layers=layers)


def stored(params: dict, layout: Layout, config: LlamaConfig) -> dict:
    """The inverse of `view`: parameters (or a gradient) read in `layout` -> the stored layout."""
    layers = params["layers"]
    if layout.per_layer:
        blocks = [_block_stored(layers[i], layout, config) for i in range(config.n_layers)]
        layers = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    else:
        layers = _block_stored(layers, layout, config)
    return dict(params, layers=layers)


def _remat(fn, remat):
    """fn, or fn recomputed in the backward pass (jax.checkpoint) under the named policy."""
    if not remat:
        return fn
    policy = None if remat is True else getattr(jax.checkpoint_policies, remat)
    return jax.checkpoint(fn, policy=policy)


def scan_layers(body, stream, layers, per_row):
    """The stacked layers in order, one lax.scan: stream = body(stream, layers[l], per_row) for each l.
    The default walk of `Transformer.hidden`; llama_jax.pipeline.pipeline is a drop-in for it."""
    return jax.lax.scan(lambda s, layer: (body(s, layer, per_row), None), stream, layers)[0]


# --- The transformer ------------------------------------------------------------------------------


class Transformer(nnx.Module):
    """The model of `config` computed as `runtime` says (resolved here: concrete dtypes and kernels),
    its weights in `layout` (default: the stored layout)."""

    def __init__(self, config: LlamaConfig, runtime: RuntimeConfig | None = None, *, rngs: nnx.Rngs,
                 layout: Layout = STORED):
        c, rt = config, (runtime or RuntimeConfig()).resolved()
        pd = jnp.dtype(rt.param_dtype)
        self.config, self.runtime, self.layout = c, rt, layout
        self.tok_embeddings = _param(rngs, (c.vocab_size, c.dim), ("vocab", "embed"), pd, 1.0)
        if layout.per_layer:
            self.layers = nnx.List([TransformerBlock(c, rt, layout, rngs=rngs) for _ in range(c.n_layers)])
        else:
            self.layers = TransformerBlock(c, rt, layout, rngs=rngs, stack=(c.n_layers,))
        self.norm = RMSNorm(c.dim, eps=c.norm_eps, impl=rt.norm_impl, dtype=pd)
        if not c.tie_embeddings:
            self.output = _param(rngs, (c.dim, c.vocab_size), ("embed", "vocab"), pd, 1.0 / math.sqrt(c.dim))
        self.dtype = jnp.dtype(rt.dtype)

    def __call__(self, tokens, positions=None, cache=None, block_table=None):
        """tokens [B, T] int32; positions [B, T] (default 0..T-1); cache: per-layer KVCache list (or
        one stacked KVCache) to fill or extend (see `Attention`), a paged pool with a block_table.
        Returns (logits [B, T, V] float32, cache)."""
        x, cache = self.hidden(tokens, positions, cache=cache, block_table=block_table)
        return self.head(x), cache

    def hidden(self, tokens, positions=None, *, cache=None, block_table=None, segment_ids=None, remat=False,
               walk=scan_layers):
        """The final-normed hidden states [B, T, D] and the cache: `__call__` without the output
        head, for a loss that applies the head in chunks. segment_ids [B, T] (packed documents:
        attention stays within a document; no cache); remat: False, True (recompute each layer in
        the backward) or the name of a `jax.checkpoint_policies` policy. walk: how stacked layers
        run without a cache, a function like `scan_layers` (the trainer passes the pipeline)."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x = ops.constrain(ops.embed(self.tok_embeddings.get_value(), tokens).astype(self.dtype), ROWS)  # (B, T, D)
        rope = rope_angles(positions, jnp.asarray(rope_frequencies(self.config)))  # a trace-time constant

        def step(graphdef):  # one layer as a function of its weights, for scan and for remat
            def body(stream, xs):
                layer_state, c = xs
                x, delta, c = nnx.merge(graphdef, layer_state)(*stream, rope, c, segment_ids, positions,
                                                                 block_table)
                return (x, delta), c
            return _remat(body, remat)

        stream = (x, jnp.zeros_like(x))  # (residual stream, the last block's output not yet added)
        if self.layout.per_layer:  # per-layer arrays, a Python loop
            new_cache = []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                stream, c = step(graphdef)(stream, (state, None if cache is None else cache[i]))
                new_cache.append(c)
            cache = None if cache is None else new_cache
        elif cache is None:  # stacked arrays, walked (scanned, or pipelined by the caller)
            graphdef, state = nnx.split(self.layers)

            def layer(stream, layer_state, per_row):
                x, delta, _ = nnx.merge(graphdef, layer_state)(*stream, *per_row)
                return x, delta

            stream = walk(_remat(layer, remat), stream, state, (rope, None, segment_ids, positions))
        else:  # stacked arrays and cache, scanned: compile time flat in depth
            graphdef, state = nnx.split(self.layers)
            stream, cache = jax.lax.scan(step(graphdef), stream, (state, cache))
        x, delta = stream
        return self.norm(delta, x)[0], cache

    def head(self, x):
        """Logits [..., V] float32 of normed hidden states x [..., D]."""
        tied = self.config.tie_embeddings  # contract with the embedding as stored: no transposed copy
        w = (self.tok_embeddings if tied else self.output).get_value()
        w = w if isinstance(w, QArray) else w.astype(self.dtype)
        return ops.linear(x, w, transposed=tied, cpu_kernels=self.runtime.cpu_kernels == "on",
                          mosaic=self.runtime.attention_impl == "mosaic")

    def init_cache(self, batch: int, max_len: int, dtype=None, sharding=None) -> list[KVCache] | KVCache:
        """`cache_zeros` of this model (dtype: default the model's)."""
        return cache_zeros(self.config, self.layout, dtype or self.dtype, batch, max_len, sharding)

    def init_pages(self, num_blocks: int, block_size: int, dtype=None, sharding=None) -> list[KVCache] | KVCache:
        """`page_zeros` of this model (dtype: default the model's)."""
        return page_zeros(self.config, self.layout, dtype or self.dtype, num_blocks, block_size, sharding)


def cache_zeros(config: LlamaConfig, layout: Layout, dtype, batch: int, max_len: int,
                sharding=None) -> list[KVCache] | KVCache:
    """An all-zero KV cache matching the layer layout: a list of per-layer [B, S, K, E] caches, or
    one stacked [L, B, S, K, E] cache for scanned layers. sharding: None, or a function of (logical
    axes, shape) -> where the arrays go (llama_jax.sharding.placement(mesh)). From the config, not a
    model: merging one costs ~10 ms, paid by every `Llama.generate`."""
    return _kv_zeros(config, layout, dtype, (batch, max_len, config.n_kv_heads, config.head_dim), CACHE_AXES, sharding)


def page_zeros(config: LlamaConfig, layout: Layout, dtype, num_blocks: int, block_size: int,
               sharding=None) -> list[KVCache] | KVCache:
    """An all-zero paged KV cache (llama_jax.block_pool), laid out as `cache_zeros`'s: per layer a
    pool of `num_blocks` blocks of `block_size` tokens, [P, block_size, K, E]."""
    return _kv_zeros(config, layout, dtype, (num_blocks, block_size, config.n_kv_heads, config.head_dim), PAGE_AXES,
                     sharding)


def _kv_zeros(config: LlamaConfig, layout: Layout, dtype, shape, axes, sharding) -> list[KVCache] | KVCache:
    if not layout.per_layer:
        shape, axes = (config.n_layers, *shape), ("layers", *axes)
    device = None if sharding is None else sharding(axes, shape)
    zeros = lambda: jnp.zeros(shape, dtype, device=device)  # noqa: E731
    if layout.per_layer:
        return [KVCache(zeros(), zeros()) for _ in range(config.n_layers)]
    return KVCache(zeros(), zeros())


class StaticGraph:
    """A model's nnx GraphDef as the static argument of jitted programs (`llama_jax.Llama.graphdef`),
    hashed once: a jitted call hashes its static arguments every time, and flax hashes a GraphDef
    node by node, about 6 ms for a 30-layer model: a decode call of a few steps pays that per call."""

    __slots__ = ("graphdef", "_hash")

    def __init__(self, graphdef: nnx.GraphDef):
        self.graphdef, self._hash = graphdef, hash(graphdef)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other) -> bool:
        return self is other or (isinstance(other, StaticGraph) and self._hash == other._hash
                                 and self.graphdef == other.graphdef)


def merge(graphdef: "nnx.GraphDef | StaticGraph", state) -> Transformer:
    """nnx.merge of a GraphDef, or a StaticGraph's, with its state."""
    return nnx.merge(graphdef.graphdef if isinstance(graphdef, StaticGraph) else graphdef, state)


def abstract(config: LlamaConfig, runtime: RuntimeConfig | None = None, layout: Layout = STORED) -> Transformer:
    """The model with no arrays (shapes, dtypes and logical axes only): for building others and for
    reading parameter shapes and shardings."""
    return nnx.merge(*_split(config, runtime, layout))


@functools.lru_cache(maxsize=None)
def _split(config, runtime, layout):
    # No mesh: abstract arrays carry logical axis names, not a mesh's shardings (even when traced
    # inside a jitted step under one).
    with no_mesh():
        return nnx.split(nnx.eval_shape(lambda: Transformer(config, runtime, rngs=nnx.Rngs(0), layout=layout)))


def build(config: LlamaConfig, params: dict, runtime: RuntimeConfig | None = None, layout: Layout = STORED
          ) -> Transformer:
    """The model whose weights are `params` (a nested dict in `layout`, e.g. `view(stored_params, ...)`),
    with no random init; host arrays stay where they are."""
    graphdef, state = _split(config, runtime, layout)
    state = jax.tree.map(lambda x: x, state)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)
