"""The Llama 3 transformer in Flax NNX, top to bottom in Llama order.

Shape letters: B batch, T query length, S key length, D model dim, H query heads, K kv heads,
G group (H // K), E head dim, F ffn dim, V vocab, L layers.

Weights of one kind are stacked over a leading layer axis L (simple checkpoints, one sharding rule per
kind). The forward either scans that axis or, after `unstack_layers`, runs a Python loop over
per-layer arrays; docs/PERFORMANCE.md has the measurements behind the default.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax import ops, pipeline
from llama_jax.config import LlamaConfig

# Logical axes of one layer's KV cache [B, S, K, E]; llama_jax.sharding maps them onto a mesh.
CACHE_AXES = ("batch", "kv_seq", "kv_heads", "head_dim")
ROWS = ("batch", "seq", "act_embed")  # activations [B, T, D]


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


def _dot(x, w, dtype, transposed=False):
    """x [B, T, in] @ w in the compute dtype, accumulated in f32. w is stored [in, out] (the checkpoint
    layout), or [out, in] if transposed (see `Transformer.unstack_layers`)."""
    return ops.linear(x, w.astype(dtype), transposed=transposed).astype(dtype)


def _dots(x, ws, dtype, transposed, fuse):
    """[x @ w for w in ws] (weights with the same input); with `fuse`, one product over the weights
    concatenated along their outputs, split after: one pass over x instead of several, and in the
    backward one product for x's gradient (the trainer on CPU, where each product is an MKL call)."""
    if not fuse:
        return [_dot(x, w, dtype, transposed) for w in ws]
    out_axis = 0 if transposed else 1
    y = _dot(x, jnp.concatenate(ws, axis=out_axis), dtype, transposed)
    return jnp.split(y, np.cumsum([w.shape[out_axis] for w in ws])[:-1].tolist(), axis=-1)


class Attention(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        c, d, h, k, e = config, config.dim, config.n_heads, config.n_kv_heads, config.head_dim
        pd = jnp.dtype(c.param_dtype)
        lx = ("layers",) * len(stack)
        std = 1.0 / math.sqrt(d)
        self.wq = _param(rngs, (*stack, d, h * e), (*lx, "embed", "q_heads"), pd, std)
        self.wk = _param(rngs, (*stack, d, k * e), (*lx, "embed", "kv_heads"), pd, std)
        self.wv = _param(rngs, (*stack, d, k * e), (*lx, "embed", "kv_heads"), pd, std)
        self.wo = _param(rngs, (*stack, h * e, d), (*lx, "q_heads", "embed"), pd, 1.0 / math.sqrt(h * e))
        self.n_heads, self.n_kv_heads, self.head_dim = h, k, e
        self.dtype = jnp.dtype(c.dtype)
        self.impl = c.attention_impl
        self.transposed = False  # weights stored [in, out]; [out, in] after unstack_layers(transpose=True)
        self.fuse = False  # q, k and v as one product (see _dots)

    def __call__(self, x, rope: Rope, cache: KVCache | None, segment_ids, positions):
        """x [B, T, D]. Without a cache: causal self-attention over x (within each document when
        segment_ids [B, T] are given). With one: T == 1 is a decode step (each sequence writes at
        positions[b, 0] and reads its first positions[b, 0] + 1 keys); T > 1 is a prefill chunk:
        every row writes its keys at start..start+T-1, start = positions[0, 0], and attends to the
        cached keys before them and to its own (chunked prefill). Returns (out, cache)."""
        b, t, _ = x.shape
        q, k, v = _dots(x, [self.wq[...], self.wk[...], self.wv[...]], self.dtype, self.transposed, self.fuse)
        q = q.reshape(b, t, self.n_heads, self.head_dim)
        k = k.reshape(b, t, self.n_kv_heads, self.head_dim)
        v = v.reshape(b, t, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # (B, T, H|K, E)

        if cache is None:
            out = ops.prefill_attention(q, k, v, segment_ids=segment_ids, impl=self.impl)
        elif t == 1:
            pos = positions[:, 0]
            batch = jnp.arange(b)
            # In bounds by construction (a cache holds every position it is given); said so, XLA
            # writes the row in place instead of copying the whole cache around the scatter.
            write = dict(mode="promise_in_bounds", unique_indices=True)
            cache = KVCache(cache.k.at[batch, pos].set(k[:, 0].astype(cache.k.dtype), **write),
                            cache.v.at[batch, pos].set(v[:, 0].astype(cache.v.dtype), **write))
            out = ops.decode_attention(q[:, 0], cache.k, cache.v, lengths=pos + 1, impl=self.impl)
            out = out[:, None]  # (B, 1, H, E)
        else:
            start = positions[0, 0]
            cache = KVCache(jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), start, 1),
                            jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), start, 1))
            # Query i sits at key start + i and sees the keys up to it. Right padding needs no mask:
            # a padded key sits after every real query of its row.
            out = ops.prefill_attention(q, cache.k, cache.v, q_offset=start, kv_length=start + t, impl=self.impl)
        out = out.reshape(b, t, self.n_heads * self.head_dim)  # (B, T, H*E)
        return _dot(out, self.wo[...], self.dtype, self.transposed), cache


class FeedForward(nnx.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        d, f = config.dim, config.ffn_dim
        pd = jnp.dtype(config.param_dtype)
        lx = ("layers",) * len(stack)
        self.w1 = _param(rngs, (*stack, d, f), (*lx, "embed", "ffn"), pd, 1.0 / math.sqrt(d))
        self.w3 = _param(rngs, (*stack, d, f), (*lx, "embed", "ffn"), pd, 1.0 / math.sqrt(d))
        self.w2 = _param(rngs, (*stack, f, d), (*lx, "ffn", "embed"), pd, 1.0 / math.sqrt(f))
        self.dtype = jnp.dtype(config.dtype)
        self.transposed = False
        self.fuse = False  # w1 and w3 as one product (see _dots)

    def __call__(self, x):
        gate, up = _dots(x, [self.w1[...], self.w3[...]], self.dtype, self.transposed, self.fuse)
        return _dot(jax.nn.silu(gate) * up, self.w2[...], self.dtype, self.transposed)


class TransformerBlock(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, stack: tuple[int, ...] = ()):
        pd = jnp.dtype(config.param_dtype)
        norm = dict(eps=config.norm_eps, impl=config.norm_impl, dtype=pd, stack=stack)
        self.attention_norm = RMSNorm(config.dim, **norm)
        self.attention = Attention(config, rngs=rngs, stack=stack)
        self.ffn_norm = RMSNorm(config.dim, **norm)
        self.feed_forward = FeedForward(config, rngs=rngs, stack=stack)

    def __call__(self, x, delta, rope, cache, segment_ids, positions):
        """A pre-norm residual block over the stream x + delta, where delta [B, T, D] is the previous
        block's FFN output, not yet added: each residual add is fused into the norm after it, so a
        block reads the stream twice instead of three times. Returns (x, delta, cache)."""
        normed, x = self.attention_norm(delta, x)  # x = x + delta
        h, cache = self.attention(normed, rope, cache, segment_ids, positions)
        normed, x = self.ffn_norm(h, x)  # x = x + attention(...)
        return x, self.feed_forward(normed), cache


LINEAR_WEIGHTS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def _layer_slice(stacked, i: int, transpose: bool = False):
    """Layer i of a stacked array (transposed if asked), or of its abstract shape (nnx.eval_shape)."""
    if isinstance(stacked, jax.ShapeDtypeStruct):
        shape, sharding = stacked.shape[1:], stacked.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec[1:]) + (None,) * (len(shape) - len(sharding.spec[1:]))
            spec = spec[::-1] if transpose else spec
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
        return jax.ShapeDtypeStruct(shape[::-1] if transpose else shape, stacked.dtype, sharding=sharding)
    return stacked[i].T if transpose else stacked[i]


def stack_layers(params: dict, n_layers: int, *, transposed: bool) -> dict:
    """Per-layer params (a nested dict, layers keyed 0..L-1, linear weights [out, in] if transposed)
    -> the checkpoint layout: each kind stacked on a leading layer axis, linear weights [in, out]."""
    layers = [{part: {k: w.T if transposed and k in LINEAR_WEIGHTS else w for k, w in ws.items()}
               for part, ws in params["layers"][i].items()} for i in range(n_layers)]
    return dict(params, layers=jax.tree.map(lambda *xs: jnp.stack(xs), *layers))


def _remat(fn, remat):
    """fn, or fn recomputed in the backward pass (jax.checkpoint) under the named policy."""
    if not remat:
        return fn
    policy = None if remat is True else getattr(jax.checkpoint_policies, remat)
    return jax.checkpoint(fn, policy=policy)


# --- The transformer ------------------------------------------------------------------------------


class Transformer(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        c = config.resolved()  # concrete dtypes and kernels from here on
        pd = jnp.dtype(c.param_dtype)
        self.config = c
        self.tok_embeddings = _param(rngs, (c.vocab_size, c.dim), ("vocab", "embed"), pd, 1.0)
        self.layers = TransformerBlock(c, rngs=rngs, stack=(c.n_layers,))
        self.norm = RMSNorm(c.dim, eps=c.norm_eps, impl=c.norm_impl, dtype=pd)
        if not c.tie_embeddings:
            self.output = _param(rngs, (c.dim, c.vocab_size), ("embed", "vocab"), pd, 1.0 / math.sqrt(c.dim))
        self.dtype = jnp.dtype(c.dtype)

    def __call__(self, tokens, positions=None, cache=None):
        """tokens [B, T] int32; positions [B, T] (default 0..T-1); cache: per-layer KVCache list (or
        one stacked KVCache) to fill or extend (see `Attention`). Returns (logits [B, T, V] float32,
        cache)."""
        x, cache = self.hidden(tokens, positions, cache=cache)
        return self.head(x), cache

    def hidden(self, tokens, positions=None, *, cache=None, segment_ids=None, remat=False, micro_batches=None):
        """The final-normed hidden states [B, T, D] and the cache: `__call__` without the output
        head, for a loss that applies the head in chunks. segment_ids [B, T] (packed documents:
        attention stays within a document; no cache); remat: False, True (recompute each layer in
        the backward) or the name of a `jax.checkpoint_policies` policy. micro_batches: how many
        pieces the batch flows through the pipeline in when the mesh splits the stacked layers into
        stages (llama_jax.pipeline; None: pipeline.default_micro_batches)."""
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        # Context parallelism (a mesh that splits the sequence): without a cache the sequence runs in
        # an order that balances the causal work over the devices, and comes back in order at the end.
        order = ops.sequence_order(t) if cache is None else None
        if order is not None:
            tokens, positions = tokens[:, order[0]], positions[:, order[0]]
            segment_ids = None if segment_ids is None else segment_ids[:, order[0]]
        x = ops.constrain(ops.embed(self.tok_embeddings[...], tokens).astype(self.dtype), ROWS)  # (B, T, D)
        rope = rope_angles(positions, jnp.asarray(rope_frequencies(self.config)))  # a trace-time constant

        def step(graphdef):  # one layer as a function of its weights, for scan and for remat
            def body(stream, xs):
                layer_state, c = xs
                x, delta, c = nnx.merge(graphdef, layer_state)(*stream, rope, c, segment_ids, positions)
                return (x, delta), c
            return _remat(body, remat)

        stream = (x, jnp.zeros_like(x))  # (residual stream, the last block's output not yet added)
        if isinstance(self.layers, nnx.List):  # per-layer arrays, a Python loop
            new_cache = []
            for i, layer in enumerate(self.layers):
                graphdef, state = nnx.split(layer)
                stream, c = step(graphdef)(stream, (state, None if cache is None else cache[i]))
                new_cache.append(c)
            cache = None if cache is None else new_cache
        elif cache is None:  # stacked arrays, scanned (pipelined over stages when the mesh has them)
            graphdef, state = nnx.split(self.layers)

            def layer(stream, layer_state, per_row):
                x, delta, _ = nnx.merge(graphdef, layer_state)(*stream, *per_row)
                return x, delta

            stream = pipeline.pipeline(_remat(layer, remat), stream, state, (rope, None, segment_ids, positions),
                                       micro_batches=micro_batches)
        else:  # stacked arrays and cache, scanned: compile time flat in depth
            graphdef, state = nnx.split(self.layers)
            stream, cache = jax.lax.scan(step(graphdef), stream, (state, cache))
        x, delta = stream
        x = self.norm(delta, x)[0]
        return (x if order is None else x[:, order[1]]), cache

    def head(self, x):
        """Logits [..., V] float32 of normed hidden states x [..., D]."""
        tied = self.config.tie_embeddings  # contract with the embedding as stored: no transposed copy
        w = self.tok_embeddings[...] if tied else self.output[...]
        return ops.linear(x, w.astype(self.dtype), transposed=tied)

    def unstack_layers(self, transpose: bool = True) -> None:
        """Replaces the stacked layers by a list of per-layer blocks (on CPU this decodes about 1.5x
        faster than scanning: docs/PERFORMANCE.md). Each stacked device array is freed once it is
        sliced, so the peak is the model plus one weight kind, not two models. transpose: store
        each linear weight [out, in], the layout in which XLA's GPU matrix-vector product reads a
        weight once (docs/GPU_COMPILE.md); the checkpoint layout is [in, out]."""
        if isinstance(self.layers, nnx.List):
            return
        graphdef, state = nnx.split(self.layers)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
        n = self.config.n_layers
        per_layer = [[] for _ in range(n)]
        for path, var in leaves:
            stacked = var.get_value()
            axes = var.get_metadata()["out_sharding"][1:]  # drop the 'layers' logical axis
            flip = transpose and _key_name(path[-1]) in LINEAR_WEIGHTS
            for i in range(n):
                v = var.replace(value=_layer_slice(stacked, i, flip))
                v.set_metadata("out_sharding", axes[::-1] if flip else axes)
                per_layer[i].append(v)
            if isinstance(stacked, jax.Array):
                stacked.delete()
        del state, leaves
        self.layers = nnx.List([nnx.merge(graphdef, jax.tree.unflatten(treedef, vs)) for vs in per_layer])
        for block in self.layers:
            block.attention.transposed = block.feed_forward.transposed = transpose

    def stacked_params(self) -> dict:
        """The parameters as a nested dict in the checkpoint layout (layers stacked on axis 0, linear
        weights [in, out]), whatever the layout the model runs in; new arrays when unstacked."""
        params = nnx.to_pure_dict(nnx.state(self, nnx.Param))
        if not isinstance(self.layers, nnx.List):
            return params
        return stack_layers(params, self.config.n_layers, transposed=self.layers[0].attention.transposed)

    def init_cache(self, batch: int, max_len: int, dtype=None, sharding=None) -> list[KVCache] | KVCache:
        """An all-zero KV cache matching the layer layout: a list of per-layer [B, S, K, E] caches, or
        one stacked [L, B, S, K, E] cache for scanned layers. sharding: None, or a function of
        (logical axes, shape) -> where the arrays go (llama_jax.sharding.placement(mesh))."""
        c = self.config
        shape, axes = (batch, max_len, c.n_kv_heads, c.head_dim), CACHE_AXES
        if not isinstance(self.layers, nnx.List):
            shape, axes = (c.n_layers, *shape), ("layers", *axes)
        device = None if sharding is None else sharding(axes, shape)
        zeros = lambda: jnp.zeros(shape, dtype or self.dtype, device=device)  # noqa: E731
        if isinstance(self.layers, nnx.List):
            return [KVCache(zeros(), zeros()) for _ in range(c.n_layers)]
        return KVCache(zeros(), zeros())
