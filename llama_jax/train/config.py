"""TrainConfig (everything that decides the updates), the learning-rate schedule and the optimizer.

The recipe is Llama 3's (Meta, "The Llama 3 Herd of Models", 2024): AdamW (b1 0.9, b2 0.95, eps 1e-8,
weight decay 0.1 on embeddings and projections, none on norm scales), linear warmup from 0 then
cosine decay to min_lr_ratio * peak_lr, and global-norm clipping at 1.0. It matches PyTorch step for
step: the schedule is a LambdaLR of the same formula (so the first step, at lr 0, changes nothing,
as with transformers' `get_cosine_schedule_with_warmup`), and clipping divides by (norm + 1e-6) as
`torch.nn.utils.clip_grad_norm_` does (optax's `clip_by_global_norm` does not add the 1e-6).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax

from llama_jax.lora import DEFAULT_TARGETS, LoraConfig

REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")
COMPUTE_DTYPES = ("float32", "bfloat16")
# The fields of LlamaConfig that make two models the same network (not how they are computed).


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm was NaN or infinite; the step's update was not applied."""


# --- Config -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the updates. batch_size: rows per micro-batch; a step takes
    grad_accum * batch_size rows of seq_len tokens. remat: False, True (recompute each layer in the
    backward) or a policy name from REMAT_POLICIES. compute_dtype: None (float32 on CPU, bfloat16 on
    GPU), "float32" or "bfloat16". loss_chunk: tokens per chunk of the output head in the loss.
    scan_layers: scan the stacked layers (compile time flat in depth) or run a Python loop over a
    per-layer view of them (on CPU about 1.3x faster per step: XLA's backward copies the scan's
    stacked activations); None: the loop on CPU, the scan elsewhere. Either way the weights, the
    optimizer state and checkpoints stay in the stored layout (llama_jax.model). micro_batches: under pipeline
    parallelism (a mesh with pp > 1), the pieces each batch_size rows flow through the stages in
    (at least pp; None: pipeline.default_micro_batches, the smallest divisor of batch_size >= 2 x pp
    whose micro-batches the data-parallel devices divide); the layers are then always scanned.
    lora_rank: None trains every weight; r trains low-rank adapters of rank r on `lora_targets`
    (names of llama_jax.lora.TARGETS: q, k, v, o, gate, up, down) with the model frozen (LoRA; with a
    quantized model, QLoRA), scaled by lora_alpha / r (lora_alpha None: 2 x r) and with dropout
    lora_dropout on each adapter's input. Only the adapters get gradients and optimizer state."""

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
    lora_rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = DEFAULT_TARGETS

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
        need(self.compute_dtype in (None, *COMPUTE_DTYPES),
             f"compute_dtype must be None or one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.lora_rank is None:
            need(self.lora_alpha is None and self.lora_dropout == 0.0 and tuple(self.lora_targets) == DEFAULT_TARGETS,
                 "lora_alpha, lora_dropout and lora_targets need lora_rank (LoRA); without it every weight trains")
        else:
            try:
                lora = self.lora()
            except ValueError as e:
                raise ValueError(f"TrainConfig: {e}") from None
            object.__setattr__(self, "lora_targets", lora.targets)

    def lora(self) -> LoraConfig | None:
        """The adapters' settings, or None for full fine-tuning."""
        if self.lora_rank is None:
            return None
        alpha = 2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha
        return LoraConfig(self.lora_rank, alpha, self.lora_dropout, self.lora_targets)

    def to_dict(self) -> dict:
        """The fields as JSON holds them (trainer.json: a resumed run must match them)."""
        return dict(dataclasses.asdict(self), lora_targets=list(self.lora_targets))


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
    return injected_optimizer(clip)(learning_rate=learning_rate, b1=config.b1, b2=config.b2, eps=config.eps,
                           weight_decay=config.weight_decay, max_norm=config.grad_clip if clip else 0.0)


@functools.lru_cache(maxsize=None)
def injected_optimizer(clip: bool):
    """The optimizer factory with its numbers injected (optax.inject_hyperparams): one per clip choice."""
    return optax.inject_hyperparams(functools.partial(_clipped_adamw, clip=clip))


# --- Loss -------------------------------------------------------------------------------------------
