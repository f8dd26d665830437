"""The jitted training step and the `Trainer` (checkpoints, evaluation, export, `llama()`).

The trainer holds float32 master weights and AdamW state in the stored layout (llama_jax.model:
stacked [L, ...], linear weights [in, out]), the layout of its checkpoints and exports too. A step
reads them through a `Layout` view chosen once for its program (`_Program.of`): scanned as stored
on a GPU (compile time flat in depth), a per-layer view on a CPU (XLA CPU's backward of a scan
spends its time copying the stacked activations), with q/k/v and w1/w3 fused into one product each
when there is no mesh (one MKL call each). The view is a pure function with a custom VJP: its
gradient is the inverse rearrangement (`model.stored`), so the gradient comes back stored too.
`compute_dtype` "bfloat16" casts inside the matmuls (f32 accumulation, f32 loss).

With LoRA (TrainConfig.lora_rank), what trains is the adapter tree (llama_jax.lora): float32, stored
layout, with its own AdamW state; the model is frozen, held once in the compute dtype (or quantized,
as loaded) and already viewed in the program's layout, so a step neither rearranges nor
differentiates it. The adapters reach the model's products through `lora.wrap` (a view with a custom
VJP, like the full weights'), so the base's weight gradients are never computed.

Parallelism is applied here, from outside the model: the pipeline walks the stacked layers when
the mesh has stages, context_parallel reorders the sequence when it splits it (llama_jax.train.loss).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import time
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import cpu_kernels
from llama_jax import lora as lora_lib
from llama_jax import model as model_lib
from llama_jax import pipeline, quant, sharding
from llama_jax.config import LlamaConfig, RuntimeConfig, default_dtype
from llama_jax.data import positions_from_segments
from llama_jax.export import copy_tokenizer_files, write_hf, write_json_atomic, write_ours
from llama_jax.model import Layout
from llama_jax.train.config import COMPUTE_DTYPES, TrainConfig, injected_optimizer, lr_at, optimizer
from llama_jax.train.loss import loss_sums

RUN_FILE = "trainer.json"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm was NaN or infinite; the step's update was not applied."""


# --- The jitted step --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Program:
    """What a compiled step depends on (a static jit argument): two Trainers with equal programs share
    the compiled functions; learning rate, betas, decay and the clip norm are traced values."""

    config: LlamaConfig
    runtime: RuntimeConfig  # resolved: float32 parameters, the compute dtype, the kernels
    layout: Layout  # how the step reads the stored weights
    grad_accum: int
    remat: bool | str
    loss_chunk: int
    clip: bool
    micro_batches: int | None  # pipeline micro-batches (None: no pipeline)
    lora: lora_lib.LoraConfig | None  # None: every weight trains

    @classmethod
    def of(cls, config: LlamaConfig, runtime: RuntimeConfig, train_config: TrainConfig, mesh=None) -> "_Program":
        tc = train_config
        scan = tc.scan_layers if tc.scan_layers is not None else jax.default_backend() != "cpu"
        micro = pipeline.micro_batch_count(mesh, config.n_layers, tc.batch_size, tc.micro_batches)
        if micro is not None:  # the pipeline runs the stacked layers
            scan = True
        # Fused weights would mix columns that tensor parallelism splits differently: no mesh only.
        layout = model_lib.STORED if scan else Layout(per_layer=True, fused=mesh is None)
        return cls(config, runtime, layout, tc.grad_accum, tc.remat, tc.loss_chunk, tc.grad_clip is not None, micro,
                   tc.lora())

    def walk(self):
        """How the stacked layers run: the pipeline over the mesh's stages, or a scan."""
        if self.micro_batches is None:
            return model_lib.scan_layers
        return functools.partial(pipeline.pipeline, micro_batches=self.micro_batches)


def _training_runtime(runtime: RuntimeConfig, train_config: TrainConfig) -> RuntimeConfig:
    """How a training step runs: float32 parameters, activations in the compute dtype, the source
    model's kernels (the Mosaic GPU attention computes in bf16 only: a float32 step takes the
    Triton kernels)."""
    compute = train_config.compute_dtype or default_dtype()
    attention = "pallas" if runtime.attention_impl == "mosaic" and compute == "float32" else runtime.attention_impl
    return dataclasses.replace(runtime, param_dtype="float32", dtype=compute, attention_impl=attention).resolved()


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _viewed(prog: _Program, params):
    """model.view(params, prog.layout) whose gradient is the inverse rearrangement, computed once:
    differentiating the slices themselves would add a full-size zero buffer per layer."""
    return model_lib.view(params, prog.layout, prog.config)


_viewed.defvjp(lambda prog, params: (_viewed(prog, params), None),
               lambda prog, _, g: (model_lib.stored(g, prog.layout, prog.config),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _adapters_viewed(prog: _Program, adapters):
    """lora.view(adapters, prog.layout), its gradient the inverse rearrangement (as `_viewed`)."""
    return lora_lib.view(adapters, prog.layout, prog.config)


_adapters_viewed.defvjp(lambda prog, adapters: (_adapters_viewed(prog, adapters), None),
                        lambda prog, _, g: (lora_lib.stored(g, prog.layout, prog.config),))


def _batch_sums(prog: _Program, params, batch, frozen=None, key=None):
    """(loss sum, target count) of one batch, params in the stored layout. With LoRA, params are the
    adapters and frozen the model's weights, viewed in prog.layout already; key: dropout's (None: none)."""
    if prog.lora is None:
        weights = params if prog.layout == model_lib.STORED else _viewed(prog, params)
    else:
        weights = lora_lib.wrap(frozen, _adapters_viewed(prog, params), prog.lora, prog.layout, prog.config, key)
    model = model_lib.build(prog.config, weights, prog.runtime, prog.layout)
    return loss_sums(model, batch["tokens"], batch["segment_ids"], batch["positions"], remat=prog.remat,
                     chunk=prog.loss_chunk, walk=prog.walk(), head_grad=prog.lora is None)


def _grad_sums(prog: _Program, params, batch, frozen, key):
    """(loss sum, target count, gradient of the loss sum) over the micro-batches of one step; the
    micro-batches run one after another (lax.scan), accumulating in f32, each with its own dropout key."""
    grad_fn = jax.value_and_grad(functools.partial(_batch_sums, prog), has_aux=True)
    k = prog.grad_accum
    if k == 1:
        (s, n), g = grad_fn(params, batch, frozen, key)
        return s, n, g
    micro = jax.tree.map(lambda a: a.reshape(k, a.shape[0] // k, *a.shape[1:]), batch)  # (k, B/k, T)

    def body(carry, xs):
        s, n, g = carry
        mb, i = xs
        (s1, n1), g1 = grad_fn(params, mb, frozen, None if key is None else jax.random.fold_in(key, i))
        return (s + s1, n + n1, jax.tree.map(jnp.add, g, g1)), None

    zero = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
    (s, n, g), _ = jax.lax.scan(body, zero, (micro, jnp.arange(k)))
    return s, n, g


def _trained_shardings(prog: _Program, mesh) -> dict:
    """Where each trained array (and its gradient, and its moments) goes on `mesh`."""
    if prog.lora is None:
        return sharding.param_shardings(model_lib.abstract(prog.config), mesh)
    return lora_lib.shardings(prog.config, prog.lora, mesh)


def _mean_loss_and_grads(prog: _Program, params, batch, frozen=None, key=None):
    """(mean loss, its gradient): the sums over all micro-batches divided by the target count, so
    accumulation gives the update of one large batch."""
    s, n, g = _grad_sums(prog, params, batch, frozen, key)
    n = jnp.maximum(n, 1.0)
    g = jax.tree.map(lambda x: x / n, g)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # each gradient split as its parameter: a reduce-scatter under 'fsdp', not an all-reduce
        g = jax.lax.with_sharding_constraint(g, _trained_shardings(prog, mesh))
    return s / n, g


_loss_and_grads = jax.jit(_mean_loss_and_grads, static_argnums=0)


def _update(clip: bool, params, opt_state, grads, loss, lr):
    """The optimizer update at learning rate `lr`, with the step's gradient and loss. A NaN or
    infinite loss or gradient leaves params and opt_state as they were (the caller stops the run),
    so a diverged step never reaches a checkpoint. A separate program from the gradient, so
    `loss_and_grads` and `step` share one compiled forward and backward."""
    grad_norm = optax.tree.norm(grads)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)
    tx = injected_optimizer(clip)(learning_rate=0.0, b1=0.0, b2=0.0, eps=0.0, weight_decay=0.0, max_norm=0.0)

    def update(params, opt_state):
        updates, new_opt = tx.update(grads, opt_state, params)  # reads its numbers from opt_state
        return optax.apply_updates(params, updates), new_opt

    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = jax.lax.cond(ok, update, lambda p, o: (p, o), params, opt_state)
    return params, opt_state, grad_norm


def _apply_update(clip: bool, placed):
    """_update jitted, params and optimizer state donated. placed: None (one device), or the
    (params, optimizer state, replicated) shardings, which the outputs keep: left to itself, XLA
    replicates the outputs of the `lax.cond`, a full f32 copy of the weights and both moments on
    every device (151 GB per device for Llama 3.1 8B on 8 GPUs: docs/TRAINING_AT_SCALE.md)."""
    key = None if placed is None else (jax.tree.structure(placed), tuple(jax.tree.leaves(placed)))
    return _update_program(clip, key)


@functools.lru_cache(maxsize=None)
def _update_program(clip: bool, key):
    """One jitted update per (clip, shardings), shared by every Trainer that has them."""
    out = None if key is None else jax.tree.unflatten(*key)
    return jax.jit(functools.partial(_update, clip), donate_argnums=(0, 1), out_shardings=out)


def _opt_shardings(tx, params, shardings, mesh):
    """Where each leaf of the optimizer state of `params` goes, given the params' shardings: a
    parameter's moments with the parameter, the rest (counts, hyperparameters) replicated; None
    without a mesh."""
    if shardings is None:
        return None
    shapes = jax.eval_shape(tx.init, params)
    rest = NamedSharding(mesh, P())
    return optax.tree_map_params(tx, lambda _, where: where, shapes, shardings, transform_non_params=lambda _: rest)


@functools.partial(jax.jit, static_argnums=0)
def _eval_sums(prog: _Program, params, batch, frozen=None):
    return _batch_sums(dataclasses.replace(prog, remat=False), params, batch, frozen)


def _frozen_dtype(runtime: RuntimeConfig, w):
    """A frozen weight as a LoRA step reads it: float weights in the compute dtype (the products cast
    to it anyway, so a float32 copy of a bfloat16-computed model would only cost memory); quantized
    weights as they are."""
    return w if isinstance(w, quant.QArray) else w.astype(runtime.dtype)


def _is_quantized(x) -> bool:
    return isinstance(x, quant.QArray)


def _frozen_shardings(prog: _Program, frozen: dict, mesh) -> dict:
    """Where each frozen weight (viewed in prog.layout) goes on `mesh`: by its logical axes, each part
    of a quantized weight too (as sharding.place puts a Llama's)."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model_lib.abstract(prog.config, prog.runtime,
                                                                                 prog.layout))))
    return jax.tree.map(lambda axes, w: jax.tree.map(
        lambda a: NamedSharding(mesh, sharding.logical_to_mesh(tuple(axes), a.shape, mesh)), w),
        specs, frozen, is_leaf=lambda x: isinstance(x, P))


def _frozen_shapes(prog: _Program, mesh, quantize: str | None) -> dict:
    """The frozen model's weights of a LoRA step as ShapeDtypeStructs, in prog.layout, on `mesh`:
    the compute dtype, or quantized to `quantize` as `llama_jax.load(quantize=...)` does."""
    config, runtime = prog.config, prog.runtime
    stored = nnx.to_pure_dict(nnx.state(model_lib.abstract(config, runtime), nnx.Param))
    stored = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, runtime.dtype), stored)
    if quantize is not None:
        stored = jax.eval_shape(lambda p: quant.quantize_params(p, quantize, model_lib.LINEAR_WEIGHTS), stored)
    viewed = jax.eval_shape(lambda p: model_lib.view(p, prog.layout, config), stored)
    return jax.tree.map(lambda a, w: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=w), viewed,
                        _frozen_shardings(prog, viewed, mesh))

def gradient_program(config: LlamaConfig, train_config: TrainConfig, mesh, runtime: RuntimeConfig | None = None, *,
                     quantize: str | None = None):
    """(jitted function, abstract arguments) of the step's gradient program, as a Trainer of a model
    of `config` on `mesh` runs it, with nothing allocated: for compiling it for another target
    (benchmarks/gpu_compile.py compiles it for H100s). `fn.trace(*args)` traces it. quantize: with
    LoRA, the frozen model quantized as `llama_jax.load(quantize=...)` quantizes it (QLoRA)."""
    runtime = _training_runtime(runtime or RuntimeConfig(), train_config)
    prog = _Program.of(config, runtime, train_config, mesh)
    rows = (train_config.batch_size * train_config.grad_accum, train_config.seq_len)
    batch = {k: jax.ShapeDtypeStruct(rows, jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
             for k in ("tokens", "segment_ids", "positions")}
    if prog.lora is not None:
        params = jax.tree.map(lambda a, where: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
                              lora_lib.shapes(config, prog.lora), lora_lib.shardings(config, prog.lora, mesh))
        key = None
        if prog.lora.dropout > 0:
            key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, P()))
        return _loss_and_grads, (prog, params, batch, _frozen_shapes(prog, mesh, quantize), key)
    model = model_lib.abstract(config, runtime)
    shapes = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(lambda a, where: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where),
                          shapes, sharding.param_shardings(model, mesh))
    return _loss_and_grads, (prog, params, batch)


def update_program(config: LlamaConfig, train_config: TrainConfig, mesh, runtime: RuntimeConfig | None = None):
    """(jitted function, abstract arguments) of the step's optimizer update (gradient norm, torch's
    clipping, AdamW, skipped on a non-finite loss; params and state donated), as a Trainer of a model
    of `config` on `mesh` runs it, with nothing allocated: `gradient_program`'s twin."""
    params = gradient_program(config, train_config, mesh, runtime)[1][1]
    tx = optimizer(train_config)
    shardings = jax.tree.map(lambda a: a.sharding, params)
    opt = _opt_shardings(tx, params, shardings, mesh)
    opt_state = jax.tree.map(lambda a, w: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=w),
                             jax.eval_shape(tx.init, params), opt)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    fn = _apply_update(train_config.grad_clip is not None, (shardings, opt, NamedSharding(mesh, P())))
    return fn, (params, opt_state, params, scalar, scalar)


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


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
        self._source = dict(runtime=model.runtime, layout=model.layout, tokenizer=model.tokenizer,
                            chat_format=model.chat_format)
        self.model_config: LlamaConfig = mc
        self.runtime: RuntimeConfig = _training_runtime(model.runtime, config)
        self._prog = _Program.of(mc, self.runtime, config, self.mesh)
        self._tx = optimizer(config)
        self.lora: lora_lib.LoraConfig | None = self._prog.lora
        self._shardings = None if self.mesh is None else _trained_shardings(self._prog, self.mesh)
        self._frozen = None  # with LoRA: the model's weights, in the step's layout, never updated
        if self.lora is None:
            # float32 copies in new buffers (the step donates them; the Llama keeps its own); a
            # quantized model trains the float weights it stands for.
            params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True),
                                  quant.dequantize_params(model.params, jnp.float32))
        else:
            frozen = jax.tree.map(functools.partial(_frozen_dtype, self.runtime), model.params, is_leaf=_is_quantized)
            frozen = model_lib.view(frozen, self._prog.layout, mc)
            self._frozen = self._place(frozen, None if self.mesh is None else
                                       _frozen_shardings(self._prog, frozen, self.mesh))
            params = lora_lib.init(mc, self.lora, jax.random.fold_in(jax.random.key(config.seed), 0))
        self._params: dict = self._place(params, self._shardings)
        with sharding.on_mesh(self.mesh):
            # The optimizer's moments are split as their parameters are (ZeRO under 'fsdp').
            opt = _opt_shardings(self._tx, self._params, self._shardings, self.mesh)
            self._opt_state = jax.jit(self._tx.init, out_shardings=opt)(self._params)
        self._update = _apply_update(self._prog.clip, None if self.mesh is None else
                                     (self._shardings, opt, NamedSharding(self.mesh, P())))
        self.step_count = 0
        self.data_state: dict | None = None  # the data position restored from a checkpoint
        if resume_from is not None:
            self.restore(resume_from)

    # --- placement and batches

    @staticmethod
    def _place(tree, shardings):
        return jax.device_put(tree) if shardings is None else jax.device_put(tree, shardings)

    @property
    def params(self) -> dict:
        """What trains, as a nested dict of float32 arrays in the stored layout (layers stacked on
        axis 0, linear weights [in, out]): the model's weights (to_hf_state_dict maps them to Hugging
        Face names), or with LoRA the adapters (llama_jax.lora's tree)."""
        return self._params

    @params.setter
    def params(self, value: dict) -> None:
        """Replaces the weights (a dict like `params`'s); the optimizer state stays."""
        self._params = self._place(value, self._shardings)

    def merged_params(self) -> dict:
        """The model's weights as trained, in the stored layout: `params`, or with LoRA the frozen
        weights with the adapters merged in (a quantized weight dequantized to float32)."""
        if self.lora is None:
            return self._params
        frozen = self._frozen
        if self._prog.layout != model_lib.STORED:
            frozen = model_lib.stored(frozen, self._prog.layout, self.model_config)
        return lora_lib.merge(frozen, self._params, self.lora)

    def dropout_key(self, step: int | None = None):
        """The LoRA dropout key of optimizer step `step` (0-based; default: the next one), None without
        dropout: a function of the seed and the step only, so a resumed run draws the masks a straight
        run would. Micro-batch i of the step uses fold_in(key, i) (with grad_accum > 1), and
        llama_jax.lora.dropout_keys splits it per layer and target."""
        step = self.step_count if step is None else step
        if self.lora is None or self.lora.dropout == 0:
            return None
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(self.config.seed), 1), step)
        return jax.device_put(key, None if self.mesh is None else NamedSharding(self.mesh, P()))

    @property
    def opt_state(self):
        """The optimizer state, its moments in the stored layout."""
        return self._opt_state

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
            out["positions"] = positions_from_segments(out["segment_ids"])
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
            loss, grads = _loss_and_grads(self._prog, self._params, b, *self._frozen_args())
        return float(loss), grads

    def _frozen_args(self) -> tuple:
        """The gradient program's arguments after the batch: none, or with LoRA the frozen weights and
        this step's dropout key."""
        return () if self.lora is None else (self._frozen, self.dropout_key())

    def lower(self, batch: dict) -> dict:
        """The step's two programs lowered for `batch` (jax.stages.Lowered, by name: "grads" and
        "update"), for reading their compiled HLO, memory and collectives (benchmarks/parallel.py)."""
        b = self._batch(batch, micro=self.config.grad_accum)
        with sharding.on_mesh(self.mesh):
            grads = jax.eval_shape(functools.partial(_loss_and_grads, self._prog), self._params, b,
                                   *self._frozen_args())
            return {"grads": _loss_and_grads.lower(self._prog, self._params, b, *self._frozen_args()),
                    "update": self._update.lower(self._params, self._opt_state, grads[1], grads[0],
                                                 np.float32(0.0))}

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
            loss, grads = _loss_and_grads(self._prog, self._params, b, *self._frozen_args())
            # The weights and the count change together (a Ctrl-C while we wait below finds them agreeing).
            self._params, self._opt_state, grad_norm = self._update(self._params, self._opt_state, grads, loss,
                                                                    np.float32(lr))
            self.step_count += 1
        loss, grad_norm = float(loss), float(grad_norm)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.step_count -= 1  # the update kept the weights as they were
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
                s, n = _eval_sums(self._prog, self._params, b, *self._frozen_args()[:1])
            total, count = total + float(s), count + float(n)
        if count == 0:
            raise ValueError("evaluate: the batches hold no target tokens")
        return total / count

    # --- checkpoints

    def _run_info(self) -> dict:
        return {"model": self.model_config.to_dict(), "train": self.config.to_dict()}

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
        # Through LlamaConfig, so that runs written before RuntimeConfig existed (their "model" held
        # dtypes and kernel choices too) compare by architecture alone.
        diff = _differences(LlamaConfig.from_dict(theirs.get("model", {})).to_dict(), mine["model"])
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
            write_json_atomic(os.path.join(directory, RUN_FILE), self._run_info())
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
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (self._params, self._opt_state))
            r = mngr.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract[0]), opt_state=ocp.args.StandardRestore(abstract[1]),
                meta=ocp.args.JsonRestore()))
        # Into our own tree structure (optax's named tuples), leaf for leaf.
        self._params = jax.tree.unflatten(jax.tree.structure(abstract[0]), jax.tree.leaves(r.params))
        self._opt_state = jax.tree.unflatten(jax.tree.structure(abstract[1]), jax.tree.leaves(r.opt_state))
        self.step_count = int(r.meta["step"])
        self.data_state = r.meta.get("data_state")

    # --- results

    def llama(self):
        """A `Llama` on the current weights, with the runtime and layout the source model had (generate
        from it; it holds its own copy, so training can go on)."""
        from llama_jax.api import from_params

        src = self._source
        dtype = jnp.dtype(src["runtime"].param_dtype)
        params = jax.tree.map(lambda p: jnp.array(p, dtype=dtype, copy=True), self.merged_params())
        return from_params(self.model_config, params, src["runtime"], tokenizer=src["tokenizer"],
                           chat_format=src["chat_format"], mesh=self.mesh, layout=src["layout"])

    def export(self, directory: str | os.PathLike, format: str | None = None, *, tokenizer_from: str | None = None,
               dtype: str = "float32", overwrite: bool = False, base_model: str | None = None) -> str:
        """Writes the current weights as a model directory. Full fine-tuning: format "hf" (the
        default: config.json and model.safetensors, which transformers loads) or "ours"
        (llama_config.json and Orbax params, as `llama-jax convert` writes). LoRA: "peft" (the
        default: adapter_config.json and adapter_model.safetensors, which peft.PeftModel and
        `llama_jax.load(base, lora=...)` load; base_model names the base in it) or "merged" (the
        model with the adapters merged in, as "hf"). tokenizer_from: a model directory whose
        tokenizer files (tokenizer.json or tokenizer.model, tokenizer_config.json, chat template,
        generation_config.json) are copied along. Written into a temporary directory and renamed
        when complete; an existing `directory` is refused unless overwrite. Returns the directory."""
        formats = ("hf", "ours") if self.lora is None else ("peft", "merged")
        format = formats[0] if format is None else format
        if format not in formats:
            run = "full fine-tuning" if self.lora is None else "LoRA"
            raise ValueError(f"export format {format!r}: a {run} run exports {formats[0]!r} or {formats[1]!r}")
        if dtype not in COMPUTE_DTYPES or (format != "ours" and dtype != "float32"):
            raise ValueError(f"export dtype {dtype!r}: 'ours' writes float32 or bfloat16, {format!r} float32")
        directory = os.path.abspath(os.fspath(directory))
        if os.path.lexists(directory) and not overwrite:
            raise FileExistsError(f"{directory}: already exists (nothing was written)")
        tmp = f"{directory}.export-{os.getpid()}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            if format == "peft":
                lora_lib.write_peft(tmp, jax.tree.map(np.asarray, self.params), self.lora, self.model_config,
                                    base_model=base_model)
            elif format == "ours":
                write_ours(tmp, jax.tree.map(np.asarray, self.params), self.model_config, dtype)
            else:
                write_hf(tmp, jax.tree.map(np.asarray, self.merged_params()), self.model_config)
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
