"""Training, top to bottom: config, loss, optimizer, the jitted step, and the Trainer (checkpoints,
evaluation, export).

The recipe is Llama 3's (Meta, "The Llama 3 Herd of Models", 2024): AdamW (b1 0.9, b2 0.95, eps 1e-8,
weight decay 0.1 on embeddings and projections, none on norm scales), linear warmup from 0 then
cosine decay to min_lr_ratio * peak_lr, global-norm clipping at 1.0, and documents packed into rows
with attention kept inside each document (llama_jax.data).

It matches PyTorch step for step (tests/test_train.py): the loss is transformers' `labels=` loss,
the schedule is a LambdaLR of the same formula (so the first step, at lr 0, changes nothing, as with
transformers' `get_cosine_schedule_with_warmup`), and clipping divides by (norm + 1e-6) as
`torch.nn.utils.clip_grad_norm_` does (optax's `clip_by_global_norm` does not add the 1e-6).

Master weights and optimizer state are float32 whatever the model was loaded in; `compute_dtype`
"bfloat16" runs the forward and backward in bfloat16 (weights cast inside each matmul, f32
accumulation, f32 loss). The model's layers are scanned (stacked weights: compile time flat in
depth) with optional remat per layer.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import sys
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from llama_jax import cpu_kernels, ops, pipeline, sharding
from llama_jax.config import LlamaConfig, default_dtype
from llama_jax.data import pack_documents  # noqa: F401  (part of this module's API: llama_jax.train.pack_documents)
from llama_jax.model import Transformer, stack_layers

# Policies that jax.checkpoint takes as they are (the others in jax.checkpoint_policies are factories).
REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
_COMPUTE_DTYPES = ("float32", "bfloat16")
# The fields of LlamaConfig that make two models the same network (not how they are computed).
_ARCH_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim", "norm_eps",
                "rope_theta", "rope_scaling", "tie_embeddings")
RUN_FILE = "trainer.json"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm was NaN or infinite; the step's update was not applied."""


# --- Config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the updates. batch_size: rows per micro-batch; a step takes
    grad_accum * batch_size rows of seq_len tokens. remat: False, True (recompute each layer in the
    backward) or a policy name from REMAT_POLICIES. compute_dtype: None (float32 on CPU, bfloat16 on
    GPU), "float32" or "bfloat16". loss_chunk: tokens per chunk of the output head in the loss.
    scan_layers: scan the stacked layers (compile time flat in depth) or run a Python loop over
    per-layer weights stored [out, in] (on CPU about 1.3x faster per step: XLA's backward copies the
    scan's stacked activations); None: the loop on CPU, the scan elsewhere. Either way the weights,
    the optimizer state and checkpoints stay stacked [in, out]. micro_batches: under pipeline
    parallelism (a mesh with pp > 1), the pieces each batch_size rows flow through the stages in
    (at least pp; None: pipeline.default_micro_batches, the smallest divisor of batch_size >= 2 x pp
    whose micro-batches the data-parallel devices divide); the layers are then always scanned."""

    peak_lr: float = 3e-4
    warmup_steps: int = 100
    total_steps: int = 1000
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0
    grad_accum: int = 1
    remat: bool | str = False
    compute_dtype: str | None = None
    seq_len: int = 512
    batch_size: int = 8
    seed: int = 0
    loss_chunk: int = 1024
    scan_layers: bool | None = None
    micro_batches: int | None = None

    def __post_init__(self):
        def need(ok, msg):
            if not ok:
                raise ValueError(f"TrainConfig: {msg}")

        need(isinstance(self.peak_lr, (int, float)) and math.isfinite(self.peak_lr) and self.peak_lr > 0,
             f"peak_lr must be a positive number, got {self.peak_lr}")
        need(self.total_steps >= 1, f"total_steps must be >= 1, got {self.total_steps}")
        need(0 <= self.warmup_steps <= self.total_steps,
             f"warmup_steps ({self.warmup_steps}) must be between 0 and total_steps ({self.total_steps})")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.b1 < 1 and 0 <= self.b2 < 1, f"b1 and b2 must be in [0, 1), got {self.b1}, {self.b2}")
        need(self.eps > 0, f"eps must be > 0, got {self.eps}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be > 0 or None, got {self.grad_clip}")
        need(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.seq_len >= 2, f"seq_len must be >= 2 (one input and one target), got {self.seq_len}")
        need(self.loss_chunk >= 1, f"loss_chunk must be >= 1, got {self.loss_chunk}")
        need(self.micro_batches is None or self.micro_batches >= 1,
             f"micro_batches must be >= 1 or None, got {self.micro_batches}")
        need(self.remat in (False, True) or self.remat in REMAT_POLICIES,
             f"remat must be False, True or one of {REMAT_POLICIES}, got {self.remat!r}")
        need(self.compute_dtype in (None, *_COMPUTE_DTYPES),
             f"compute_dtype must be None or one of {_COMPUTE_DTYPES}, got {self.compute_dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- Schedule and optimizer -------------------------------------------------------------------------


def lr_at(config: TrainConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup from 0 to peak_lr over
    warmup_steps, then cosine decay to min_lr_ratio * peak_lr at total_steps (held after). Computed on
    the host in float64, like the torch LambdaLR it is tested against."""
    peak, w, total, r = config.peak_lr, config.warmup_steps, config.total_steps, config.min_lr_ratio
    if step < w:
        return peak * step / w
    progress = min(1.0, (step - w) / max(total - w, 1))
    return peak * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * progress)))


def clip_by_global_norm_like_torch(max_norm) -> optax.GradientTransformation:
    """Scales the updates by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ does."""

    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params: dict) -> dict:
    """True for the weights AdamW decays (embeddings, projections, the output head), False for norm
    scales; params is a nested dict of our parameter names."""
    def mask(path, _):
        return not any(str(getattr(k, "key", k)).endswith("norm") for k in path)
    return jax.tree_util.tree_map_with_path(mask, params)


def _clipped_adamw(learning_rate, b1, b2, eps, weight_decay, max_norm, clip: bool):
    adamw = optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
    return optax.chain(clip_by_global_norm_like_torch(max_norm), adamw) if clip else adamw


def optimizer(config: TrainConfig, learning_rate: float = 0.0) -> optax.GradientTransformation:
    """Clipping (torch's rule) then AdamW with weight decay off the norm scales. Its numbers live in
    the optimizer state (optax.inject_hyperparams), so one compiled step serves every setting: the
    Trainer writes each step's learning rate (`lr_at`) into `state.hyperparams["learning_rate"]`."""
    clip = config.grad_clip is not None
    return _injected(clip)(learning_rate=learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, max_norm=config.grad_clip if clip else 0.0)


@functools.lru_cache(maxsize=None)
def _injected(clip: bool):
    return optax.inject_hyperparams(functools.partial(_clipped_adamw, clip=clip))


# --- Loss -------------------------------------------------------------------------------------------


def _targets(tokens, segment_ids):
    """Next-token targets [B, T-1] and their weights: 1 where token t+1 follows t in the same document,
    0 across a document boundary, on padding (segment 0), and for unpacked rows never."""
    targets = tokens[:, 1:]
    if segment_ids is None:
        return targets, jnp.ones(targets.shape, jnp.float32)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    return targets, same.astype(jnp.float32)


def _head(tied: bool, w, x):
    """Logits [B, C, V] f32 of hidden states x [B, C, D]: Transformer.head with its weight passed in
    (the embedding [V, D] when tied, else the output [D, V]), so the loss can differentiate it by hand."""
    return ops.linear(x, w.astype(x.dtype), transposed=tied)


def _chunk_loss(tied, w, hc, tc, wc):
    """(sum of wc * cross-entropy, softmax [B, C, V]) of one chunk: one pass of exp serves both."""
    logits = _head(tied, w, hc)  # (B, C, V) f32
    top = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - top)
    total = jnp.sum(e, axis=-1, keepdims=True)
    lse = (top + jnp.log(total))[..., 0]
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return jnp.sum(wc * (lse - picked)), e / total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def chunked_cross_entropy(tied: bool, w, h, targets, weights):
    """Sum of weights * next-token cross-entropy, f32, over chunks: h [n, B, C, D] hidden states,
    targets and weights [n, B, C] (each chunk keeps the batch axis, so a batch split over devices
    stays split). One chunk's [B, C, V] f32 logits exist at a time, forward and backward:
    the gradient is computed in the forward pass (softmax minus one-hot, chunk by chunk, the head's
    two matmuls), so nothing is recomputed and the backward only scales it."""
    def body(_, xs):
        return None, _chunk_loss(tied, w, *xs)[0]
    _, losses = jax.lax.scan(body, None, (h, targets, weights))
    return jnp.sum(losses)


def _cross_entropy_fwd(tied, w, h, targets, weights):
    wx = w.astype(h.dtype)

    def body(dw, xs):
        hc, tc, wc = xs
        loss, p = _chunk_loss(tied, w, hc, tc, wc)
        onehot = tc[..., None] == jnp.arange(p.shape[-1])
        dlogits = (jnp.where(onehot, p - 1, p) * wc[..., None]).astype(hc.dtype)  # (softmax - one-hot) * weight
        dh = ops.linear(dlogits, wx, transposed=not tied)  # (B, C, D)
        dw = dw + (ops.contract_rows(dlogits, hc) if tied else ops.contract_rows(hc, dlogits))
        return dw, (loss, dh.astype(hc.dtype))

    dw, (losses, dh) = jax.lax.scan(body, jnp.zeros(w.shape, jnp.float32), (h, targets, weights))
    return jnp.sum(losses), (dw.astype(w.dtype), dh, targets, weights)


def _cross_entropy_bwd(tied, res, g):
    dw, dh, targets, weights = res
    return ((g * dw).astype(dw.dtype), (g * dh).astype(dh.dtype), np.zeros(targets.shape, jax.dtypes.float0),
            jnp.zeros_like(weights))


chunked_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def loss_sums(model: Transformer, tokens, segment_ids=None, positions=None, *, remat=False, chunk: int = 1024,
              micro_batches: int | None = None):
    """(sum of next-token cross-entropies over the target tokens, their count), both f32, of one batch
    [B, T]. The output head runs over about `chunk` tokens at a time, chunk // B of each row
    (chunked_cross_entropy), so the full [B, T, V] f32 logits never exist."""
    h, _ = model.hidden(tokens, positions, segment_ids=segment_ids, remat=remat, micro_batches=micro_batches)
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
    tied = model.config.tie_embeddings
    w = model.tok_embeddings[...] if tied else model.output[...]
    return _cross_entropy_per_device(tied, w, h, targets, weights), jnp.sum(weights)


def _cross_entropy_per_device(tied: bool, w, h, targets, weights):
    """chunked_cross_entropy, run per device over the mesh's batch split (a shard_map manual over
    the batch axes): each device adds its rows' head gradient up over all its chunks and the devices
    sum it once, where the map ends (a reduce-scatter under 'fsdp'). Left to XLA, the head gradient
    was reduce-scattered inside the chunk loop, once per chunk: for Llama 3.2 1B on 8 H100s
    (fsdp4 x tp2), 32 reduce-scatters of a 525 MB f32 [V/2, D] a step."""
    mesh = jax.sharding.get_abstract_mesh()
    entry = None if mesh.empty else sharding.spec(("batch",), mesh)[0]
    if entry is None:
        return chunked_cross_entropy(tied, w, h, targets, weights)
    axes = (entry,) if isinstance(entry, str) else tuple(entry)
    w_axes = ("vocab", "embed") if tied else ("embed", "vocab")
    # w as split over the batch axes only ('fsdp' splits the weights' D); the rest stays Auto.
    w_spec = P(*(e if e in axes else None for e in sharding.logical_to_mesh(w_axes, w.shape, mesh)))

    def local(w, h, targets, weights):
        for dim, e in enumerate(w_spec):
            if e is not None:  # the whole weight on each device (its transpose: one reduce-scatter)
                w = jax.lax.all_gather(w, e, axis=dim, tiled=True)
        return jax.lax.psum(chunked_cross_entropy(tied, w, h, targets, weights), axes)

    rows = P(None, entry)  # h [n, B, C, D], targets and weights [n, B, C]: split by B
    return jax.shard_map(local, in_specs=(w_spec, rows, rows, rows), out_specs=P(), axis_names=set(axes),
                         check_vma=False)(w, h, targets, weights)


# --- The jitted step --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Program:
    """What a compiled step depends on (a static jit argument): two Trainers with equal programs share
    the compiled functions; learning rate, betas, decay and the clip norm are traced values."""

    model: LlamaConfig  # the training model: float32 parameters, the compute dtype
    grad_accum: int
    remat: bool | str
    loss_chunk: int
    clip: bool
    scan_layers: bool
    micro_batches: int | None  # pipeline micro-batches (None: no pipeline)
    # The per-layer walk without a mesh (CPU, one device): the state kept per layer, so a step slices
    # and stacks nothing, and q/k/v and w1/w3 as one product each (model._dots). Under a mesh the
    # state stays stacked and is sliced inside the step: fused weights would mix columns that
    # tensor parallelism splits differently.
    per_layer: bool

    @classmethod
    def of(cls, model: LlamaConfig, config: TrainConfig, mesh=None) -> "_Program":
        scan = config.scan_layers if config.scan_layers is not None else jax.default_backend() != "cpu"
        micro = pipeline.micro_batch_count(mesh, model.n_layers, config.batch_size, config.micro_batches)
        if micro is not None:  # the pipeline runs the stacked layers
            scan = True
        return cls(model, config.grad_accum, config.remat, config.loss_chunk, config.grad_clip is not None, scan,
                   micro, not scan and mesh is None)


@functools.lru_cache(maxsize=None)
def _split_model(config: LlamaConfig, scan: bool = True, fuse: bool = False):
    """(graphdef, abstract state) of a Transformer of `config` with no arrays: stacked layers, or
    per-layer blocks with linear weights [in, out] as stored (Transformer.unstack_layers; the CPU's
    MKL products take either layout, so no step transposes every weight and gradient), their
    q/k/v and w1/w3 products fused if asked."""
    with sharding.no_mesh():  # abstract arrays carry logical axis names, not a mesh's shardings
        model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    if not scan:
        model.unstack_layers(transpose=False)
        for block in model.layers:
            block.attention.fuse = block.feed_forward.fuse = fuse
    return nnx.split(model)


def _abstract_model(config: LlamaConfig) -> Transformer:
    """The model with stacked layers and no arrays (the checkpoint layout)."""
    return nnx.merge(*_split_model(config, True))


def _merge(config: LlamaConfig, params: dict, scan: bool = True, fuse: bool = False) -> Transformer:
    """The model whose weights are `params` (a nested dict like nnx.to_pure_dict's, in the layout
    `scan` says: see _per_layer)."""
    graphdef, abstract = _split_model(config, scan, fuse)
    state = jax.tree.map(lambda x: x, abstract)  # a fresh State to fill
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _per_layer(params: dict, n_layers: int) -> dict:
    """Stacked params -> per-layer blocks (slices, same layout); the inverse of
    model.stack_layers(..., transposed=False)."""
    return dict(params, layers={i: jax.tree.map(lambda w: w[i], params["layers"]) for i in range(n_layers)})


@functools.partial(jax.jit, static_argnums=1)
def _stacked_tree(tree, n_layers: int):
    """Every per-layer parameter-shaped dict of tree stacked back (the checkpoint layout)."""
    return _relayout(tree, lambda p: stack_layers(p, n_layers, transposed=False))


def _relayout(tree, fn):
    """fn applied to every parameter-shaped dict (one with "layers") in tree: the params, a
    gradient, or the moments inside an optax state (named tuples of such dicts)."""
    if isinstance(tree, dict):
        return fn(tree) if "layers" in tree else {k: _relayout(v, fn) for k, v in tree.items()}
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_relayout(v, fn) for v in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_relayout(v, fn) for v in tree)
    return tree


def _batch_sums(prog: _Program, params, batch):
    return loss_sums(_merge(prog.model, params, prog.scan_layers, prog.per_layer), batch["tokens"], batch["segment_ids"],
                     batch["positions"], remat=prog.remat, chunk=prog.loss_chunk, micro_batches=prog.micro_batches)


def _grad_sums(prog: _Program, params, batch):
    """(loss sum, target count, gradient of the loss sum) over the micro-batches of one step; the
    micro-batches run one after another (lax.scan), accumulating in f32. params and the gradient
    are in the state's layout; a stacked state walked per layer is sliced here and its gradient
    stacked once at the end (differentiating the slicing itself would add a full-size zero buffer
    per layer)."""
    if prog.scan_layers or prog.per_layer:
        return _grad_sums_in(prog, params, batch)
    s, n, g = _grad_sums_in(prog, _per_layer(params, prog.model.n_layers), batch)
    return s, n, stack_layers(g, prog.model.n_layers, transposed=False)


def _grad_sums_in(prog: _Program, params, batch):
    grad_fn = jax.value_and_grad(functools.partial(_batch_sums, prog), has_aux=True)
    k = prog.grad_accum
    if k == 1:
        (s, n), g = grad_fn(params, batch)
        return s, n, g
    micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)  # (k, B/k, T)

    def body(carry, mb):
        s, n, g = carry
        (s1, n1), g1 = grad_fn(params, mb)
        return (s + s1, n + n1, jax.tree.map(jnp.add, g, g1)), None

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (s, n, g), _ = jax.lax.scan(body, zero, micro)
    return s, n, g


def _mean_loss_and_grads(prog: _Program, params, batch):
    """(mean loss, its gradient): the sums over all micro-batches divided by the target count, so
    accumulation gives the update of one large batch."""
    s, n, g = _grad_sums(prog, params, batch)
    n = jnp.maximum(n, 1.0)
    g = jax.tree.map(lambda x: x / n, g)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # each gradient split as its parameter: a reduce-scatter under 'fsdp', not an all-reduce
        g = jax.lax.with_sharding_constraint(g, sharding.param_shardings(_abstract_model(prog.model), mesh))
    return s / n, g


_loss_and_grads = jax.jit(_mean_loss_and_grads, static_argnums=0)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(1, 2))
def _apply_update(clip: bool, params, opt_state, grads, loss, lr):
    """The optimizer update at learning rate `lr`, with the step's gradient and loss. A NaN or
    infinite loss or gradient leaves params and opt_state as they were (the caller stops the run),
    so a diverged step never reaches a checkpoint. A separate program from the gradient, so
    `loss_and_grads` and `step` share one compiled forward and backward."""
    grad_norm = optax.tree.norm(grads)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    tx = _injected(clip)(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0, max_norm=0.0)

    def update(params, opt_state):
        updates, new_opt = tx.update(grads, opt_state, params)  # reads its numbers from opt_state
        return optax.apply_updates(params, updates), new_opt

    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.lax.cond(ok, update, lambda p, o: (p, o), params, opt_state)
    return params, opt_state, grad_norm


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(prog: _Program, params, batch):
    if not (prog.scan_layers or prog.per_layer):
        params = _per_layer(params, prog.model.n_layers)
    return _batch_sums(dataclasses.replace(prog, remat=False), params, batch)


def _training_config(config: LlamaConfig, train_config: TrainConfig) -> LlamaConfig:
    """The model a training step runs: float32 parameters, activations in the compute dtype."""
    compute = train_config.compute_dtype or default_dtype()
    return dataclasses.replace(config, param_dtype="float32", dtype=compute).resolved()


def gradient_program(config: LlamaConfig, train_config: TrainConfig, mesh):
    """(jitted function, abstract arguments) of the step's gradient program, as a Trainer of a model
    of `config` on `mesh` runs it, with nothing allocated: for compiling it for another target
    (benchmarks/gpu_compile.py compiles it for H100s). `fn.trace(*args)` traces it."""
    config = _training_config(config, train_config)
    prog = _Program.of(config, train_config, mesh)
    model = _abstract_model(config)
    shapes = nnx.to_pure_dict(nnx.state(model))
    params = jax.tree.map(lambda a, where: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
                          shapes, sharding.param_shardings(model, mesh))
    rows = (train_config.batch_size * train_config.grad_accum, train_config.seq_len)
    batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
             for k in ("tokens", "segment_ids", "positions")}
    return _loss_and_grads, (prog, params, batch)


# --- Parameters in and out --------------------------------------------------------------------------


def _stacked_params(llama) -> dict:
    """The Llama's weights in the checkpoint layout (layers stacked on axis 0, linear weights
    [in, out]) as a nested dict of float32 arrays in new buffers (the step donates them; the Llama
    keeps its own)."""
    return jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), llama.model.stacked_params())


def _architecture(config: LlamaConfig) -> dict:
    d = config.to_dict()
    return {k: d[k] for k in _ARCH_FIELDS}


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def _write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# --- The Trainer ------------------------------------------------------------------------------------


class Trainer:
    """Trains a `Llama` (from `llama_jax.load` or `from_config`) with `TrainConfig`.

    `step(batch)` takes one optimizer step; `loss_and_grads(batch)` computes without updating;
    `save(dir)` writes a checkpoint (weights, optimizer state, step, data position) and
    `Trainer(model, config, resume_from=dir)` continues from the latest one; `export(dir)` writes
    Hugging Face safetensors or our format; `llama()` is a Llama on the current weights.

    A batch is a dict of integer numpy arrays: `tokens` [B, T] and, optionally, `segment_ids` and
    `positions` [B, T] (as llama_jax.data packs them; positions default to restarting at each
    segment, or 0..T-1 without segments). B must be a multiple of grad_accum: a step runs B /
    grad_accum rows at a time and updates once."""

    def __init__(self, model, config: TrainConfig, *, resume_from: str | os.PathLike | None = None,
                 keep_checkpoints: int = 3):
        mc = model.config
        if config.seq_len > mc.max_seq_len:
            raise ValueError(f"seq_len {config.seq_len} is past the model's context ({mc.max_seq_len} tokens)")
        self.config = config
        self.keep_checkpoints = keep_checkpoints
        self.mesh = model.mesh
        if jax.default_backend() == "cpu":
            cpu_kernels.keep_freed_memory()
        # What llama() needs of the source model; not its arrays, which the caller may free.
        self._source = dict(config=mc, tokenizer=model.tokenizer, chat_format=model.chat_format,
                            unstacked=isinstance(model.model.layers, nnx.List))
        self.model_config: LlamaConfig = _training_config(mc, config)
        self._prog = _Program.of(self.model_config, config, self.mesh)
        self._tx = optimizer(config)
        # The state is stacked, or per layer on the per-layer walk without a mesh (slicing and
        # stacking it in each step cost 10% of a CPU step); `params` and checkpoints are stacked.
        self._shardings = None
        if self.mesh is not None:
            self._shardings = sharding.param_shardings(_abstract_model(self.model_config), self.mesh)
        self._params: dict = self._place(self._to_state(_stacked_params(model)), self._shardings)
        with sharding.on_mesh(self.mesh):
            # The optimizer's moments are split as their parameters are (ZeRO under 'fsdp').
            self._opt_state = jax.jit(self._tx.init, out_shardings=self._opt_shardings(self._params, self._shardings)
                                      )(self._params)
        self.step_count = 0
        self.data_state: dict | None = None  # the data position restored from a checkpoint
        if resume_from is not None:
            self.restore(resume_from)

    # --- placement and batches

    def _opt_shardings(self, params, shardings):
        """Where each leaf of the optimizer state of `params` goes, given the params' shardings: a
        parameter's moments with the parameter, the rest (counts, hyperparameters) replicated; None
        without a mesh."""
        if shardings is None:
            return None
        shapes = jax.eval_shape(self._tx.init, params)
        rest = NamedSharding(self.mesh, P())
        return optax.tree_map_params(self._tx, lambda _, where: where, shapes, shardings,
                                     transform_non_params=lambda _: rest)

    @staticmethod
    def _place(tree, shardings):
        return jax.device_put(tree) if shardings is None else jax.device_put(tree, shardings)

    # --- layouts: the state's and the checkpoint's (stacked layers)

    def _to_state(self, tree):
        if not self._prog.per_layer:
            return tree
        return _relayout(tree, lambda p: _per_layer(p, self.model_config.n_layers))

    def _to_stacked(self, tree):
        """tree (params, a gradient or an optimizer state) in the checkpoint layout (new arrays if
        the state is per layer)."""
        return _stacked_tree(tree, self.model_config.n_layers) if self._prog.per_layer else tree

    @property
    def params(self) -> dict:
        """The weights as a nested dict of float32 arrays in the checkpoint layout (layers stacked on
        axis 0, linear weights [in, out]; to_hf_state_dict maps it to Hugging Face names)."""
        return self._to_stacked(self._params)

    @params.setter
    def params(self, value: dict) -> None:
        """Replaces the weights (a dict like `params`'s); the optimizer state stays."""
        self._params = self._place(self._to_state(value), self._shardings)

    @property
    def opt_state(self):
        """The optimizer state, its moments in the checkpoint layout."""
        return self._to_stacked(self._opt_state)

    def _batch(self, batch: dict, *, micro: int) -> dict:
        """Checks a host batch and puts it on the device(s); fills positions from segment_ids."""
        if not isinstance(batch, dict) or "tokens" not in batch:
            raise ValueError("a batch is a dict with 'tokens' [B, T] (and optionally 'segment_ids', 'positions')")
        unknown = set(batch) - {"tokens", "segment_ids", "positions"}
        if unknown:
            raise ValueError(f"unknown batch keys {sorted(unknown)}")
        out = {}
        for key, a in batch.items():
            if a is None:
                continue
            a = np.asarray(a)
            if a.ndim != 2 or not np.issubdtype(a.dtype, np.integer):
                raise ValueError(f"batch[{key!r}] must be a 2-D integer array [B, T], got {a.dtype} {a.shape}")
            out[key] = a.astype(np.int32)
        tokens = out["tokens"]
        b, t = tokens.shape
        for key, a in out.items():
            if a.shape != (b, t):
                raise ValueError(f"batch[{key!r}] has shape {a.shape}, tokens {tokens.shape}")
        if t < 2:
            raise ValueError(f"rows of {t} token(s) hold no next-token target")
        if t > self.model_config.max_seq_len:
            raise ValueError(f"rows of {t} tokens are past the model's context ({self.model_config.max_seq_len})")
        if tokens.min() < 0 or tokens.max() >= self.model_config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.model_config.vocab_size})")
        if b % micro:
            raise ValueError(f"batch of {b} rows is not a multiple of grad_accum ({micro})")
        # Always both, so packed and unpacked batches share one compiled step: one segment per row
        # masks nothing, and positions restart at each segment.
        if "segment_ids" not in out:
            out["segment_ids"] = np.ones((b, t), np.int32)
        if "positions" not in out:
            out["positions"] = _positions_from_segments(out["segment_ids"])
        if self.mesh is None:
            return {k: jax.device_put(v) for k, v in out.items()}
        cp = sharding.axis_size("seq", self.mesh)
        if cp > 1 and t % (2 * cp):
            raise ValueError(f"rows of {t} tokens do not split over context parallelism cp={cp}: the sequence "
                             f"length must be a multiple of 2 x cp = {2 * cp} (e.g. {t + -t % (2 * cp)})")
        where = sharding.batch_sharding(self.mesh, 2)
        if jax.process_count() == 1:
            sharding.check_batch(self.mesh, b // micro)
            return {k: jax.device_put(v, where) for k, v in out.items()}
        # Several processes: each passes only its own rows (process_rows), one global batch.
        global_b = b * jax.process_count()
        sharding.check_batch(self.mesh, global_b // micro)
        return {k: jax.make_array_from_process_local_data(where, v, (global_b, t)) for k, v in out.items()}

    def process_rows(self, batch_size: int) -> tuple[int, int]:
        """The rows [start, stop) of a global batch of `batch_size` rows that this process feeds to
        `step` (its devices' part of the batch axis); (0, batch_size) in a single process."""
        if self.mesh is None or jax.process_count() == 1:
            return 0, batch_size
        where = sharding.batch_sharding(self.mesh, 2)
        rows = {(i[0].start or 0, batch_size if i[0].stop is None else i[0].stop)
                for i in where.addressable_devices_indices_map((batch_size, 1)).values()}
        start, stop = min(r[0] for r in rows), max(r[1] for r in rows)
        if stop - start != batch_size // jax.process_count():
            raise ValueError(f"this process's devices hold rows {sorted(rows)} of the batch: not one "
                             "contiguous equal share; put the data axes outermost in the mesh")
        return start, stop

    # --- computing

    def loss_and_grads(self, batch: dict) -> tuple[float, dict]:
        """(mean loss over the batch's target tokens, its gradient as a nested dict of float32 arrays
        shaped like the params, layers stacked), accumulated over grad_accum micro-batches, without
        clipping or updating. `llama_jax.checkpoint.to_hf_state_dict` maps the gradient to HF names."""
        b = self._batch(batch, micro=self.config.grad_accum)
        with sharding.on_mesh(self.mesh):
            loss, grads = _loss_and_grads(self._prog, self._params, b)
        return float(loss), self._to_stacked(grads)

    def lower(self, batch: dict) -> dict:
        """The step's two programs lowered for `batch` (jax.stages.Lowered, by name: "grads" and
        "update"), for reading their compiled HLO, memory and collectives (benchmarks/parallel.py)."""
        b = self._batch(batch, micro=self.config.grad_accum)
        with sharding.on_mesh(self.mesh):
            grads = jax.eval_shape(functools.partial(_loss_and_grads, self._prog), self._params, b)
            return {"grads": _loss_and_grads.lower(self._prog, self._params, b),
                    "update": _apply_update.lower(self._prog.clip, self._params, self._opt_state, grads[1],
                                                  grads[0], np.float32(0.0))}

    def lr(self, step: int | None = None) -> float:
        """The learning rate of optimizer step `step` (0-based; default: the next one)."""
        return lr_at(self.config, self.step_count if step is None else step)

    def step(self, batch: dict) -> dict:
        """One optimizer step on `batch`. Returns dict(loss, grad_norm (before clipping), lr (of this
        step), tokens_per_s (non-padding tokens over the step's wall time), step (steps done)).
        Raises TrainingDiverged, leaving the weights as they were, if the loss or gradient is not finite."""
        start = time.perf_counter()
        b = self._batch(batch, micro=self.config.grad_accum)
        n_tokens = int(np.count_nonzero(np.asarray(batch["segment_ids"]))) if batch.get("segment_ids") is not None \
            else int(np.size(batch["tokens"]))
        lr = self.lr()
        with sharding.on_mesh(self.mesh):
            loss, grads = _loss_and_grads(self._prog, self._params, b)
            # The weights and the count change together (a Ctrl-C while we wait below finds them agreeing).
            self._params, self._opt_state, grad_norm = _apply_update(self._prog.clip, self._params, self._opt_state,
                                                                     grads, loss, np.float32(lr))
            self.step_count += 1
        loss, grad_norm = float(loss), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.step_count -= 1  # _apply_update kept the weights as they were
            raise TrainingDiverged(f"step {self.step_count + 1}: the loss is {loss} (gradient norm {grad_norm}); "
                                   f"the update was not applied: the weights are those after step {self.step_count}. "
                                   "Lower the learning rate or check the data")
        elapsed = time.perf_counter() - start
        return {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens_per_s": n_tokens / elapsed,
                "step": self.step_count}

    def evaluate(self, batches: Iterable[dict]) -> float:
        """The mean next-token loss over all target tokens of `batches` (no update)."""
        total = count = 0.0
        for batch in batches:
            b = self._batch(batch, micro=1)
            with sharding.on_mesh(self.mesh):
                s, n = _eval_sums(self._prog, self._params, b)
            total, count = total + float(s), count + float(n)
        if count == 0:
            raise ValueError("evaluate: the batches hold no target tokens")
        return total / count

    # --- checkpoints

    def _run_info(self) -> dict:
        return {"model": _architecture(self.model_config), "train": self.config.to_dict()}

    def _check_run(self, directory: str, *, resuming: bool) -> None:
        """Refuses a directory holding checkpoints of another model or another TrainConfig."""
        path = os.path.join(directory, RUN_FILE)
        if not os.path.isfile(path):
            if resuming:
                raise FileNotFoundError(f"{directory}: no training checkpoint here (no {RUN_FILE})")
            if os.path.isdir(directory) and os.listdir(directory):
                raise ValueError(f"{directory}: not empty and not a training checkpoint directory (no {RUN_FILE}); "
                                 "nothing was written")
            return
        with open(path) as f:
            theirs = json.load(f)
        mine = self._run_info()
        diff = _differences(theirs.get("model", {}), mine["model"])
        if diff:
            raise ValueError(f"{directory}: holds checkpoints of another model ({'; '.join(diff[:3])}); "
                             "nothing was written")
        diff = _differences(theirs.get("train", {}), mine["train"])
        if diff:
            raise ValueError(f"{directory}: holds checkpoints of a run with another TrainConfig "
                             f"({'; '.join(diff[:3])}); a resumed run must use the same settings")

    def _manager(self, directory: str, *, create: bool):
        import orbax.checkpoint as ocp

        options = ocp.CheckpointManagerOptions(max_to_keep=self.keep_checkpoints, create=create,
                                               enable_async_checkpointing=False)
        return ocp.CheckpointManager(directory, options=options)

    def save(self, directory: str | os.PathLike, *, data_state: dict | None = None) -> str:
        """Writes a checkpoint of the current step into `directory` (Orbax CheckpointManager: one
        subdirectory per step, the last `keep_checkpoints` kept). Orbax writes each step into a
        temporary directory and renames it when complete, so a process killed mid-save leaves the
        previous checkpoints intact. data_state: the data iterator's position (Batches.state()).
        Returns the step's directory."""
        import orbax.checkpoint as ocp

        directory = os.path.abspath(os.fspath(directory))
        self._check_run(directory, resuming=False)
        os.makedirs(directory, exist_ok=True)
        if not os.path.isfile(os.path.join(directory, RUN_FILE)):
            _write_json_atomic(os.path.join(directory, RUN_FILE), self._run_info())
        meta = {"step": self.step_count, "data_state": data_state, "seed": self.config.seed,
                "model_config": self.model_config.to_dict(), "time": time.time()}
        with self._manager(directory, create=True) as mngr:
            mngr.save(self.step_count, force=True, args=ocp.args.Composite(
                params=ocp.args.StandardSave(self.params), opt_state=ocp.args.StandardSave(self.opt_state),
                meta=ocp.args.JsonSave(meta)))
            mngr.wait_until_finished()
        return os.path.join(directory, str(self.step_count))

    def restore(self, directory: str | os.PathLike, step: int | None = None) -> None:
        """Loads weights, optimizer state, step and data position from the checkpoint `directory`
        (its latest step, or `step`); refuses one of another model or TrainConfig."""
        import orbax.checkpoint as ocp

        directory = os.path.abspath(os.fspath(directory))
        self._check_run(directory, resuming=True)
        with self._manager(directory, create=False) as mngr:
            step = mngr.latest_step() if step is None else step
            if step is None:
                raise FileNotFoundError(f"{directory}: no complete checkpoint to resume from")
            if self._prog.per_layer:  # no mesh: the stacked state's shapes, on this device
                device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
                abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                                        jax.eval_shape(self._to_stacked, (self._params, self._opt_state)))
            else:
                abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (self._params, self._opt_state))
            r = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract[0]), opt_state=ocp.args.StandardRestore(abstract[1]),
                meta=ocp.args.JsonRestore()))
        # Into our own tree structure (optax's named tuples), leaf for leaf, then the state's layout.
        params = jax.tree.unflatten(jax.tree.structure(abstract[0]), jax.tree.leaves(r.params))
        opt_state = jax.tree.unflatten(jax.tree.structure(abstract[1]), jax.tree.leaves(r.opt_state))
        self.step_count = int(r.meta["step"])
        self.data_state = r.meta.get("data_state")
        del r
        self._params, self._opt_state = self._to_state(params), self._to_state(opt_state)

    # --- results

    def llama(self):
        """A `Llama` on the current weights, in the dtype and layout the source model had (generate
        from it; it holds its own copy, so training can go on)."""
        from llama_jax.api import Llama, _build

        src = self._source
        dtype = jnp.dtype(src["config"].dtype)
        params = jax.tree.map(lambda p: jnp.array(p, dtype=dtype, copy=True), self.params)
        return Llama(_build(src["config"], params), tokenizer=src["tokenizer"], chat_format=src["chat_format"],
                     mesh=self.mesh, unstack_layers=src["unstacked"])

    def export(self, directory: str | os.PathLike, format: str = "hf", *, tokenizer_from: str | None = None,
               dtype: str = "float32", overwrite: bool = False) -> str:
        """Writes the current weights as a model directory: format "hf" (config.json and
        model.safetensors, which transformers loads) or "ours" (llama_config.json and Orbax params, as
        `llama-jax convert` writes). tokenizer_from: a model directory whose tokenizer files
        (tokenizer.json or tokenizer.model, tokenizer_config.json, chat template, generation_config.json)
        are copied along. Written into a temporary directory and renamed when complete; an existing
        `directory` is refused unless overwrite. Returns the directory."""
        if format not in ("hf", "ours"):
            raise ValueError(f"export format must be 'hf' or 'ours', got {format!r}")
        if dtype not in _COMPUTE_DTYPES or (format == "hf" and dtype != "float32"):
            raise ValueError(f"export dtype {dtype!r}: 'hf' writes float32; 'ours' float32 or bfloat16")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.lexists(directory) and not overwrite:
            raise FileExistsError(f"{directory}: already exists (nothing was written)")
        tmp = f"{directory}.export-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            config = dataclasses.replace(self.model_config, param_dtype=dtype, dtype=None, attention_impl="auto",
                                         norm_impl="auto")
            host = jax.tree.map(np.asarray, self.params)
            if format == "hf":
                write_hf(tmp, host, config)
            else:
                write_ours(tmp, host, config, dtype)
            if tokenizer_from is not None:
                copy_tokenizer_files(tokenizer_from, tmp)
            if os.path.lexists(directory):
                shutil.rmtree(directory)
            os.rename(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory


# --- The loop ---------------------------------------------------------------------------------------


def fit(trainer: Trainer, batches, *, checkpoint_dir: str | os.PathLike, eval_data: list[dict] | None = None,
        eval_every: int = 0, save_every: int = 0, stop_after: int | None = None, metrics_path: str | None = None,
        progress: bool = True, log=None) -> dict:
    """Runs `trainer` to config.total_steps on `batches` (a llama_jax.data.Batches, whose position
    goes into each checkpoint), evaluating on `eval_data` every `eval_every` steps and at the end,
    checkpointing into `checkpoint_dir` every `save_every` steps, at the end, after `stop_after` steps
    of this call, and on Ctrl-C. Appends one JSON line per step and per evaluation to `metrics_path`;
    `log(text)` gets a line now and then when there is no progress bar. Returns the last metrics and
    eval loss. A diverged step raises TrainingDiverged with the checkpoints left as they were."""
    from tqdm import tqdm

    total = trainer.config.total_steps
    start = trainer.step_count
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=None if progress else True,
               file=sys.stderr, dynamic_ncols=True)
    every = max(1, (total - start) // 20)
    metrics_file = open(metrics_path, "a") if metrics_path else None
    last, eval_loss, saved = {}, None, start

    def record(obj):
        if metrics_file:
            metrics_file.write(json.dumps(obj) + "\n")
            metrics_file.flush()

    def save():
        nonlocal saved
        if saved != trainer.step_count:
            trainer.save(checkpoint_dir, data_state=batches.state())
            saved = trainer.step_count

    try:
        while trainer.step_count < total and (stop_after is None or trainer.step_count - start < stop_after):
            last = trainer.step(next(batches))
            record({**last, "epoch": round(batches.epoch, 4), "time": time.time()})
            bar.update(1)
            bar.set_postfix_str(f"loss {last['loss']:.4f}  lr {last['lr']:.2e}  {last['tokens_per_s']:.0f} tok/s")
            step = trainer.step_count
            if bar.disable and log and (step % every == 0 or step == total):
                log(f"step {step}/{total}: loss {last['loss']:.4f}, lr {last['lr']:.2e}, "
                    f"{last['tokens_per_s']:.0f} tokens/s")
            if eval_data and ((eval_every and step % eval_every == 0) or step == total):
                eval_loss = trainer.evaluate(eval_data)
                record({"step": step, "eval_loss": eval_loss, "time": time.time()})
                if log:
                    (bar.write if not bar.disable else log)(f"step {step}: eval loss {eval_loss:.4f}")
            if (save_every and step % save_every == 0) or step == total:
                save()
        save()  # stop_after
    except KeyboardInterrupt:
        save()  # the last complete step, so --resume continues from here
        raise
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {**last, "eval_loss": eval_loss, "step": trainer.step_count}


def _positions_from_segments(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at each change of segment id along a row (0 on padding)."""
    b, t = segment_ids.shape
    idx = np.broadcast_to(np.arange(t), (b, t))
    starts = np.concatenate([np.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    first = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    return np.where(segment_ids != 0, idx - first, 0).astype(np.int32)


# --- Export writers ---------------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files a model directory has into dst; returns their names."""
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in found:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return found


def write_hf(directory: str, params: dict, config: LlamaConfig) -> None:
    """config.json and model.safetensors (float32) that transformers' LlamaForCausalLM loads."""
    from safetensors.numpy import save_file

    from llama_jax.checkpoint import hf_config_dict, to_hf_state_dict

    tensors = {k: v.astype(np.float32) for k, v in to_hf_state_dict(params, config).items()}
    path = os.path.join(directory, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; make it readable like the other files
    _write_json_atomic(os.path.join(directory, "config.json"), hf_config_dict(config, dtype="float32"))


def write_ours(directory: str, params: dict, config: LlamaConfig, dtype: str) -> None:
    """Our converted format (llama_jax.orbax_io): Orbax params beside llama_config.json."""
    from llama_jax import orbax_io
    from llama_jax.checkpoint import param_shapes

    def tensors():
        for path in param_shapes(config):
            node = params
            for key in path:
                node = node[key]
            if path[0] == "layers":
                for i in range(node.shape[0]):
                    yield path, i, node[i]
            else:
                yield path, None, node

    orbax_io.write_params(os.path.join(directory, orbax_io.PARAMS_DIR), config, dtype, tensors())
    orbax_io.write_config(directory, config)
