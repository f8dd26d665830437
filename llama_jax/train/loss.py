"""The loss: next-token cross-entropy over packed rows, the output head applied in chunks.

It is transformers' `labels=` loss (the mean next-token cross-entropy, targets across a document
boundary or on padding ignored), summed here and divided by the target count by the step. The
[B, T, V] f32 logits never exist: `chunked_cross_entropy` is a custom VJP that computes the output
head's gradient chunk by chunk in the forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax import context_parallel, ops, sharding
from llama_jax.model import Transformer, scan_layers
from llama_jax.quant import QArray


def _targets(tokens, segment_ids):
    """Next-token targets [B, T-1] and their weights: 1 where token t+1 follows t in the same document,
    0 across a document boundary, on padding (segment 0), and for unpacked rows never."""
    targets = tokens[:, 1:]
    if segment_ids is None:
        return targets, jnp.ones(targets.shape, jnp.float32)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return targets, same.astype(jnp.float32)


def _head(tied: bool, cpu: bool, w, x):
    """Logits [B, C, V] f32 of hidden states x [B, C, D]: Transformer.head with its weight passed in
    (the embedding [V, D] when tied, else the output [D, V]), so the loss can differentiate it by hand.
    cpu: the RuntimeConfig's cpu_kernels resolved "on"."""
    return ops.linear(x, w if isinstance(w, QArray) else w.astype(x.dtype), transposed=tied, cpu_kernels=cpu)


def _chunk_loss(tied, cpu, w, hc, tc, wc):
    """(sum of wc * cross-entropy, softmax [B, C, V]) of one chunk: one pass of exp serves both."""
    logits = _head(tied, cpu, w, hc)  # (B, C, V) f32
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    lse = (top + jnp.log(total))[..., 0]
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jnp.sum(wc * (lse - picked)), e / total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def chunked_cross_entropy(tied: bool, cpu: bool, head_grad: bool, w, h, targets, weights):
    """Sum of weights * next-token cross-entropy, f32, over chunks: h [n, B, C, D] hidden states,
    targets and weights [n, B, C] (each chunk keeps the batch axis, so a batch split over devices
    stays split). One chunk's [B, C, V] f32 logits exist at a time, forward and backward:
    the gradient is computed in the forward pass (softmax minus one-hot, chunk by chunk, the head's
    two matmuls), so nothing is recomputed and the backward only scales it. cpu: the products on the
    C++ CPU backend where it serves (RuntimeConfig.cpu_kernels resolved "on"). head_grad: False when
    w is frozen (LoRA): its gradient, a [V, D] product per chunk, is then not computed (zero)."""
    def body(_, xs):
        return None, _chunk_loss(tied, cpu, w, *xs)[0]
    _, losses = jax.lax.scan(body, None, (h, targets, weights))
    return jnp.sum(losses)


def _cross_entropy_fwd(tied, cpu, head_grad, w, h, targets, weights):
    def body(dw, xs):
        hc, tc, wc = xs
        loss, p = _chunk_loss(tied, cpu, w, hc, tc, wc)
        onehot = tc[..., None] == jnp.arange(p.shape[-1])
        dlogits = (jnp.where(onehot, p - 1, p) * wc[..., None]).astype(hc.dtype)  # (softmax - one-hot) * weight
        if isinstance(w, QArray):  # a frozen quantized head (QLoRA): the product's own transpose
            dh = jax.vjp(functools.partial(_head, tied, cpu, w), hc)[1](dlogits.astype(jnp.float32))[0]
        else:
            dh = ops.linear(dlogits, w.astype(hc.dtype), transposed=not tied, cpu_kernels=cpu)  # (B, C, D)
        if head_grad:
            dw = dw + (ops.contract_rows(dlogits, hc, cpu_kernels=cpu) if tied else
                       ops.contract_rows(hc, dlogits, cpu_kernels=cpu))
        return dw, (loss, dh.astype(hc.dtype))

    dw, (losses, dh) = jax.lax.scan(body, jnp.zeros(w.shape if head_grad else (), jnp.float32),
                                    (h, targets, weights))
    dw = dw.astype(w.dtype) if head_grad else _zeros_like(w)
    return jnp.sum(losses), (dw, dh, targets, weights)


def _zeros_like(w):
    """A zero cotangent of w, a frozen head (float0 for a QArray's integer parts)."""
    return jax.tree.map(lambda a: jnp.zeros_like(a) if jnp.issubdtype(a.dtype, jnp.inexact)
                        else np.zeros(a.shape, jax.dtypes.float0), w)


def _cross_entropy_bwd(tied, cpu, head_grad, res, g):
    dw, dh, targets, weights = res
    if head_grad:
        dw = (g * dw).astype(dw.dtype)
    return dw, (g * dh).astype(dh.dtype), np.zeros(targets.shape, jax.dtypes.float0), jnp.zeros_like(weights)


chunked_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def loss_sums(model: Transformer, tokens, segment_ids=None, positions=None, *, remat=False, chunk: int = 1024,
              walk=scan_layers, head_grad: bool = True):
    """(sum of next-token cross-entropies over the target tokens, their count), both f32, of one batch
    [B, T]. The output head runs over about `chunk` tokens at a time, chunk // B of each row
    (chunked_cross_entropy), so the full [B, T, V] f32 logits never exist. walk: how stacked layers
    run (`Transformer.hidden`; the trainer passes the pipeline under a mesh with stages). Under a
    mesh that splits the sequence, the forward runs context-parallel (context_parallel.hidden).
    head_grad: False when the output head is frozen (LoRA), so its gradient is not computed."""
    h, _ = context_parallel.hidden(model, tokens, positions, segment_ids=segment_ids, remat=remat, walk=walk)
    targets, weights = _targets(tokens, segment_ids)  # (B, T-1)
    b, t = targets.shape
    c = min(max(1, chunk // b), t)  # tokens of each row per chunk
    pad = -t % c
    h = h[:, :-1]
    if pad:  # zero-weight tokens to a whole number of chunks
        h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
        targets, weights = jnp.pad(targets, ((0, 0), (0, pad))), jnp.pad(weights, ((0, 0), (0, pad)))

    def chunks(a):  # (B, n*C, ...) -> (n, B, C, ...)
        return jnp.moveaxis(a.reshape(b, -1, c, *a.shape[2:]), 1, 0)

    h, targets, weights = chunks(h), chunks(targets), chunks(weights)
    tied, cpu = model.config.tie_embeddings, model.runtime.cpu_kernels == "on"
    w = (model.tok_embeddings if tied else model.output).get_value()
    return _cross_entropy_per_device(tied, cpu, head_grad, w, h, targets, weights), jnp.sum(weights)


def _cross_entropy_per_device(tied: bool, cpu: bool, head_grad: bool, w, h, targets, weights):
    """chunked_cross_entropy, run per device over the mesh's batch split (a shard_map manual over
    the batch axes): each device adds its rows' head gradient up over all its chunks and the devices
    sum it once, where the map ends (a reduce-scatter under 'fsdp'). Left to XLA, the head gradient
    was reduce-scattered inside the chunk loop, once per chunk: for Llama 3.2 1B on 8 H100s
    (fsdp4 x tp2), 32 reduce-scatters of a 525 MB f32 [V/2, D] a step."""
    mesh = jax.sharding.get_abstract_mesh()
    entry = None if mesh.empty else sharding.spec(("batch",), mesh)[0]
    if entry is None:
        return chunked_cross_entropy(tied, cpu, head_grad, w, h, targets, weights)
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    w_axes = ("vocab", "embed") if tied else ("embed", "vocab")
    # w as split over the batch axes only ('fsdp' splits the weights' D); the rest stays Auto.
    w_spec = P(*(e if e in axes else None for e in sharding.logical_to_mesh(w_axes, w.shape, mesh)))

    def local(w, h, targets, weights):
        for dim, e in enumerate(w_spec):
            if e is not None:  # the whole weight on each device (its transpose: one reduce-scatter)
                w = jax.lax.all_gather(w, e, axis=dim, tiled=True)
        return jax.lax.psum(chunked_cross_entropy(tied, cpu, head_grad, w, h, targets, weights), axes)

    rows = P(None, entry)  # h [n, B, C, D], targets and weights [n, B, C]: split by B
    return jax.shard_map(local, in_specs=(w_spec, rows, rows, rows), out_specs=P(), axis_names=set(axes),
                         check_vma=False)(w, h, targets, weights)
