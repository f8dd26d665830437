"""What the kernels share: the backend choice, the online-softmax step, padding helpers.

Backend: Triton, on purpose. In jax 0.10.2 a bare `pl.pallas_call` lowers through Mosaic GPU,
which rejects row-wise reductions ("No support for axes yet"); Triton lowers them, along with
masked loads and gathers. Every kernel therefore passes `triton_params(...)`.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental.pallas import triton as plt

# Softmax in base 2: exp(x) = exp2(x * log2(e)), one multiply folded into the logit scale.
LOG2E = math.log2(math.e)

# A finite "minus infinity": exp2(MASK_VALUE - m) underflows to 0 without the inf - inf = NaN
# that a real -inf gives when a whole row is masked.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# jax renamed TritonCompilerParams to CompilerParams; accept either spelling.
_CompilerParams = getattr(plt, "CompilerParams", None) or getattr(plt, "TritonCompilerParams")


def triton_params(num_warps: int, num_stages: int):
    """Compiler params that select the Triton backend for `pl.pallas_call` on GPU."""
    return _CompilerParams(num_warps=num_warps, num_stages=num_stages)


def sm_scale_or_default(sm_scale, head_dim: int) -> float:
    """The logit scale: 1 / sqrt(head_dim) unless given."""
    return 1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale)


def by_platform(fn, interpret: bool | None, *args):
    """fn(interpret, *args). interpret=None is decided when the program is lowered, not traced:
    the Pallas interpreter for CPU, compiled kernels for a GPU. So one traced program runs on
    this CPU and also compiles for an H100 target from a CPU-only host (`make gpu-check`)."""
    if interpret is not None:
        return fn(bool(interpret), *args)
    return lax.platform_dependent(*args, cpu=functools.partial(fn, True),
                                  default=functools.partial(fn, False))


def normalize_masks(B, T, S, q_offset, kv_lengths, q_segment_ids, kv_segment_ids):
    """The attention masks' arguments as the kernels and references take them: per-sequence int32
    q_off [B] (default S - T: the queries are the last T keys), kv_len [B] (clipped to [0, S]),
    and int32 segment ids (or None; q_segment_ids alone serves for both when T == S)."""
    q_off = jnp.broadcast_to(jnp.asarray(S - T if q_offset is None else q_offset, jnp.int32), (B,))
    kv_len = S if kv_lengths is None else jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, S)
    kv_len = jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (B,))
    if kv_segment_ids is None and q_segment_ids is not None:
        if T != S:
            raise ValueError("kv_segment_ids is required when T != S")
        kv_segment_ids = q_segment_ids
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("kv_segment_ids given without q_segment_ids")
    if q_segment_ids is not None:
        q_segment_ids = jnp.asarray(q_segment_ids, jnp.int32)
        kv_segment_ids = jnp.asarray(kv_segment_ids, jnp.int32)
    return q_off, kv_len, q_segment_ids, kv_segment_ids


# --- Online softmax (FlashAttention-2, Dao 2023), shared by the flash and decode kernels ----------


def softmax_init(rows: int, head_dim: int):
    """The empty carry (acc (rows, E), running max m (rows,), running sum l (rows,)), f32."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def softmax_step(carry, s, load_v, mask=None):
    """Folds one key block into the carry: s (rows, block_k) f32 logits already scaled by
    sm_scale * LOG2E, load_v() -> (block_k, E) values, mask (rows, block_k) or None (every key
    visible). As the Triton tutorial's `_attn_fwd_inner`: rescale by exp2(m - m_new), add p @ v."""
    acc, m, l = carry
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:  # a row with no visible key so far must add nothing
        p = jnp.where(mask, p, 0.0)
    alpha = jnp.exp2(m - m_new)
    v = load_v()
    acc = acc * alpha[:, None] + dot(p.astype(v.dtype), v)
    return acc, m_new, l * alpha + jnp.sum(p, axis=1)


def softmax_finish(carry):
    """(out (rows, E) f32, lse (rows,) base 2, empty (rows,) bool) of a finished carry; a row that
    saw no key gets out 0 and empty True (its lse is the caller's to set)."""
    acc, m, l = carry
    empty = l == 0.0
    l = jnp.where(empty, 1.0, l)
    return acc / l[:, None], m + jnp.log2(l), empty


# --- Shapes ---------------------------------------------------------------------------------------


def merge_splits(o, lse):
    """Flash-decoding's merge of partial results over key splits (axis 2): o [B, K, splits, Gp, Ep]
    normalized partial outputs and lse [B, K, splits, Gp] their base-2 log-sum-exps -> [B, K, Gp, Ep],
    each split weighted by its share of the total softmax mass. Empty splits carry lse = MASK_VALUE,
    hence weight 0 (or all equal when every split is empty, whose outputs are all 0)."""
    lse_max = jnp.max(lse, axis=2, keepdims=True)
    w = jnp.exp2(lse - lse_max)  # (B, K, splits, Gp)
    return jnp.sum(o * w[..., None], axis=2) / jnp.sum(w, axis=2)[..., None]


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def pad_axis(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    """Pads `axis` of x up to `size` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


# The Triton dot (with trans_a/trans_b and f32 accumulation) moved from `pl` to the triton
# module; take it from wherever this jax has it.
def _find_dot():
    from jax.experimental import pallas as pl
    return getattr(plt, "dot", None) or pl.dot


dot = _find_dot()
