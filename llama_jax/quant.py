"""Quantized weights (issue #25): int8, int4 and fp8 weight-only arrays, GGUF's own blocks kept.

A `QArray` is one linear weight in a quantized form, a JAX pytree (`values`, `scales`, optional
`mins`) with static `format`, `group_size` and `axis` (the input axis, along which groups run). It
follows the stored layout: a weight [in, out] (stacked [L, in, out]) has axis -2; the inference view
[out, in] has axis -1 (`transpose` turns one into the other). The axis is negative so that slicing
or stacking leading (layer) axes with `jax.tree.map` keeps a QArray valid; its logical shape is
derived from `values`, never stored, for the same reason.

The formats, each value = q * scale (+ min):
- "int8": int8 q in [-127, 127], f32 scales per output channel (group_size None: one group spans the
  input axis); GGUF Q8_0 is int8 with group_size 32 and f16 scales.
- "int4": nibbles 0..15 packed two per uint8, q = nibble - 8 (symmetric, GGUF Q4_0) or q = nibble
  with a per-group min (asymmetric, GGUF Q4_1), f16 scales (and mins) per group of `group_size`
  (default 32) along the input. Packed as GGUF packs a block: within each group of G values along
  the input, byte j holds value j (low nibble) and value j + G/2 (high nibble). So a GGUF block is
  kept byte for byte, and unpacking is two masks and a concatenation, no interleave. Packed rather
  than `jnp.int4`: XLA CPU (jax 0.10.2) holds an int4 array in one byte per value, no smaller than
  int8.
- "fp8": float8_e4m3fn values, f32 scales per output channel (absmax -> 448).

Why our own types and not Qwix (google/qwix): Qwix quantizes a Flax model by intercepting its
`dot_general`/`einsum` calls (a provider rewrites the module's ops), keeps its own `QArray`
(qvalue, scale, zero_point, qtype) and its own tiling conventions. We need three things it does not
give: GGUF's blocks kept byte for byte (nibble order, f16 scale and min per block, value = q * d + m),
a layout that follows ours through `model.view`/`stored` and the sharding table (each shard's scales
with its rows), and a product we dispatch ourselves (`ops.linear`: XLA, the C++ CPU backend, Pallas
on GPU). The types here are a few hundred lines; a dependency that rewrites the model's ops would sit
under every layer. Its calibration names (absmax, minmax) and per-channel / sub-channel split are the
vocabulary used here.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

FORMATS = ("int8", "int4", "fp8")
INT4_GROUP = 32  # GGUF's block, and the default group
_FP8 = jnp.float8_e4m3fn
_FP8_MAX = 448.0  # the largest finite float8_e4m3fn


@functools.partial(jax.tree_util.register_dataclass, data_fields=["values", "scales", "mins"],
                   meta_fields=["format", "group_size", "axis"])
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized weight. values: int8 / packed uint8 (int4, the input axis halved) / float8_e4m3fn;
    scales: the weight's shape with the input axis divided by the group size (1 when per channel);
    mins: like scales, int4 asymmetric only. format: "int8" | "int4" | "fp8"; group_size: values per
    scale along the input axis, None for one group over the whole axis (per output channel); axis:
    the input axis, -2 ([..., in, out], the stored layout) or -1 ([..., out, in])."""

    values: jax.Array | np.ndarray
    scales: jax.Array | np.ndarray
    mins: jax.Array | np.ndarray | None
    format: str
    group_size: int | None
    axis: int

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"QArray: format {self.format!r} is not one of {FORMATS}")
        if self.axis not in (-1, -2):
            raise ValueError(f"QArray: axis must be -1 or -2, got {self.axis}")
        if self.mins is not None and self.format != "int4":
            raise ValueError(f"QArray: mins are for int4 only, not {self.format}")

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized) shape."""
        shape = list(self.values.shape)
        if self.format == "int4":
            shape[self.axis] *= 2
        return tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: values, scales and mins (what a decode step reads)."""
        return sum(a.size * a.dtype.itemsize for a in (self.values, self.scales, self.mins) if a is not None)


def transpose(q: QArray) -> QArray:
    """q with its last two axes swapped ([in, out] <-> [out, in]): values, scales and mins move
    together, and the input axis is renamed, so `model.view`'s transposed layouts can use it."""
    swap = lambda a: None if a is None else a.swapaxes(-1, -2)  # noqa: E731
    return QArray(swap(q.values), swap(q.scales), swap(q.mins), q.format, q.group_size, -3 - q.axis)


# --- Quantizing -----------------------------------------------------------------------------------


def _group_view(a, axis: int, groups: int):
    """a [..., K, N] (axis -2) -> [..., groups, K / groups, N]; a [..., N, K] (axis -1) ->
    [..., N, groups, K / groups]: the input axis split into its groups."""
    shape = list(a.shape)
    k = shape[axis]
    pos = len(shape) + axis
    return a.reshape(*shape[:pos], groups, k // groups, *shape[pos + 1:])


def _ungroup(a, axis: int):
    """The inverse of _group_view: the group axes merged back into the input axis."""
    pos = a.ndim + axis - 1  # the groups' axis
    return a.reshape(*a.shape[:pos], a.shape[pos] * a.shape[pos + 1], *a.shape[pos + 2:])


def _groups(k: int, group_size: int | None, fmt: str) -> int:
    if group_size is None:
        return 1
    if group_size < 1 or k % group_size:
        raise ValueError(f"quantize: group_size {group_size} does not divide the input axis ({k})")
    if fmt == "int4" and group_size % 2:
        raise ValueError(f"quantize: int4 needs an even group_size, got {group_size}")
    return k // group_size


def _pack(nibbles, axis: int):
    """uint8 nibbles grouped [..., groups, G, ...] along the input -> packed bytes, the input axis
    halved: byte j of a group holds nibble j (low) and nibble j + G/2 (high), as GGUF packs a block."""
    pos = nibbles.ndim + axis  # the within-group axis
    lo, hi = jnp.split(nibbles, 2, axis=pos)
    return _ungroup(lo | (hi << 4), axis)


def _unpack(packed, axis: int, groups: int):
    """Packed bytes (input axis halved) -> nibbles 0..15 grouped [..., groups, G, ...], uint8."""
    g = _group_view(packed, axis, groups)
    pos = g.ndim + axis
    return jnp.concatenate([g & 15, g >> 4], axis=pos)


def quantize(w, fmt: str, *, group_size: int | None = ..., asymmetric: bool = False, axis: int = -2) -> QArray:
    """Round-to-nearest quantization of a weight w [..., in, out] (axis -2, the stored layout; axis
    -1 for [..., out, in]) -> QArray.

    int8: symmetric, scale = absmax / 127 per output channel (group_size None) or per group.
    int4: groups of `group_size` (default 32) along the input; symmetric (scale = absmax / 7, q in
    [-7, 7]) or, with asymmetric=True, scale = (max - min) / 15 and a min per group (GGUF Q4_1's
    form). Scales and mins are float16, as GGUF keeps them (4.5 and 5 bits a weight), and values are
    rounded against the float16 scale, so the error stays half a step.
    fp8: e4m3, scale = absmax / 448 per output channel; the cast rounds to nearest even.
    A group of zeros gets scale 0 and dequantizes to zeros."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize: format {fmt!r} is not one of {', '.join(FORMATS)}")
    if axis not in (-1, -2):
        raise ValueError(f"quantize: axis must be -1 or -2, got {axis}")
    if asymmetric and fmt != "int4":
        raise ValueError("quantize: asymmetric is for int4 only")
    if group_size is ...:
        group_size = INT4_GROUP if fmt == "int4" else None
    w = jnp.asarray(w, jnp.float32)
    if w.ndim < 2:
        raise ValueError(f"quantize: a weight has at least two axes, got shape {w.shape}")
    groups = _groups(w.shape[axis], group_size, fmt)
    g = _group_view(w, axis, groups)  # (..., groups, G, N) or (..., N, groups, G)
    inner = g.ndim + axis  # the within-group axis
    safe_div = lambda a, s: jnp.where(s == 0, 0.0, a / jnp.where(s == 0, 1.0, s))  # noqa: E731

    if fmt == "int4" and asymmetric:
        lo, hi = jnp.min(g, axis=inner, keepdims=True), jnp.max(g, axis=inner, keepdims=True)
        scale = ((hi - lo) / 15).astype(jnp.float16)
        mins = lo.astype(jnp.float16)
        s32, m32 = scale.astype(jnp.float32), mins.astype(jnp.float32)
        nib = jnp.clip(jnp.round(safe_div(g - m32, s32)), 0, 15).astype(jnp.uint8)
        return QArray(_pack(nib, axis), jnp.squeeze(scale, inner), jnp.squeeze(mins, inner), fmt, group_size, axis)

    absmax = jnp.max(jnp.abs(g), axis=inner, keepdims=True)
    if fmt == "int4":
        scale = (absmax / 7).astype(jnp.float16)
        q = jnp.clip(jnp.round(safe_div(g, scale.astype(jnp.float32))), -7, 7)
        values = _pack((q + 8).astype(jnp.uint8), axis)
    elif fmt == "int8":
        scale = absmax / 127
        values = _ungroup(jnp.clip(jnp.round(safe_div(g, scale)), -127, 127).astype(jnp.int8), axis)
    else:  # fp8
        scale = absmax / _FP8_MAX
        values = _ungroup(jnp.clip(safe_div(g, scale), -_FP8_MAX, _FP8_MAX).astype(_FP8), axis)
    return QArray(values, jnp.squeeze(scale, inner), None, fmt, group_size, axis)


def dequantize(q: QArray, dtype=jnp.float32):
    """The weight q stands for, [..., in, out] (or [..., out, in] for axis -1), in `dtype`. Computed
    in f32 (value * scale + min, as GGUF dequantizes, so GGUF blocks come back bit for bit) and cast
    once at the end."""
    groups = q.scales.shape[q.axis]
    if q.format == "int4":
        v = _unpack(jnp.asarray(q.values), q.axis, groups).astype(jnp.float32)  # (..., groups, G, ...)
        if q.mins is None:
            v = v - 8
    else:
        v = _group_view(jnp.asarray(q.values).astype(jnp.float32), q.axis, groups)
    inner = v.ndim + q.axis
    w = v * jnp.expand_dims(jnp.asarray(q.scales).astype(jnp.float32), inner)
    if q.mins is not None:
        w = w + jnp.expand_dims(jnp.asarray(q.mins).astype(jnp.float32), inner)
    return _ungroup(w, q.axis).astype(dtype)


# --- Reshaping ------------------------------------------------------------------------------------


def _out_axis(q: QArray) -> int:
    """The output axis of a weight's last two: the one that is not the input axis."""
    return -3 - q.axis


def _same_kind(qs) -> None:
    kinds = {(q.format, q.group_size, q.axis, q.mins is None) for q in qs}
    if len(kinds) != 1:
        raise ValueError(f"quantized weights of different kinds cannot be joined: {sorted(map(str, kinds))}")


def concatenate_out(qs: list[QArray]) -> QArray:
    """The QArrays side by side along their outputs (a fused wq|wk|wv): each output channel keeps its
    own scales, so values, scales and mins concatenate along the same axis."""
    _same_kind(qs)
    q0, axis = qs[0], _out_axis(qs[0])
    join = lambda *a: None if a[0] is None else jnp.concatenate(a, axis=axis)  # noqa: E731
    return QArray(join(*(q.values for q in qs)), join(*(q.scales for q in qs)), join(*(q.mins for q in qs)),
                  q0.format, q0.group_size, q0.axis)


def split_out(q: QArray, indices) -> list[QArray]:
    """The inverse of concatenate_out: q split along its outputs at `indices` (as jnp.split's)."""
    axis = _out_axis(q)
    parts = [None if a is None else jnp.split(a, indices, axis=axis) for a in (q.values, q.scales, q.mins)]
    return [QArray(v, s, None if parts[2] is None else parts[2][i], q.format, q.group_size, q.axis)
            for i, (v, s) in enumerate(zip(parts[0], parts[1]))]


def take_rows(q: QArray, index):
    """Rows of a table [V, D] held as a QArray with its input axis last (an embedding that is also
    the tied output head), at `index` (any int array) -> [*index.shape, D] float32: only the rows
    looked up are dequantized."""
    if q.ndim != 2 or q.axis != -1:
        raise ValueError(f"take_rows: a [rows, features] table quantized along its features, got shape "
                         f"{q.shape} with input axis {q.axis}")
    pick = lambda a: None if a is None else jnp.asarray(a)[index]  # noqa: E731
    return dequantize(QArray(pick(q.values), pick(q.scales), pick(q.mins), q.format, q.group_size, -1))


# --- The product ----------------------------------------------------------------------------------


def _product(x, q: QArray):
    """x [..., in] @ q (2-D) -> [..., out] f32, the dequantization written into the product."""
    spec = "...K,KN->...N" if q.axis == -2 else "...K,NK->...N"
    cdt = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    if q.format != "int4" and q.group_size is None:
        # One scale per output channel factors out of the sum: x @ (v * s) = (x @ v) * s. The product
        # reads the int8 / fp8 values through a convert (which XLA's GPU emitter fuses into the dot;
        # int8 and e4m3 values are exact in bf16), and the scales cost one multiply per output.
        y = jnp.einsum(spec, x, jnp.asarray(q.values).astype(cdt), preferred_element_type=jnp.float32)
        return y * jnp.asarray(q.scales).astype(jnp.float32).reshape(-1)
    return jnp.einsum(spec, x, dequantize(q, cdt), preferred_element_type=jnp.float32)


def qlinear(x, q: QArray, *, out_tile: int | None = None):
    """x [..., in] @ q -> [..., out] f32, for a 2-D QArray (one layer's weight, either layout).

    out_tile: None computes one product, the dequantization written into it: what XLA's GPU
    compiler fuses (the f32 weight never exists). XLA CPU does not fuse a convert into a dot: it
    writes the whole dequantized f32 weight first, more bytes than the float model reads. With
    out_tile=T the output channels go T at a time through a lax.map, so only a [in, T] tile is
    dequantized at a time (it stays in cache); out must be a multiple of T. Neither beats float32 on
    XLA CPU (benchmarks/quant_matvec.py): a CPU speed-up needs a kernel that reads the bytes itself,
    which is why ops.linear sends quantized products to the C++ CPU backend where it serves, and to
    the Pallas kernel on a GPU; this is the reference both are tested against."""
    if q.ndim != 2:
        raise ValueError(f"qlinear: one layer's weight (2-D), got shape {q.shape}")
    k = q.shape[q.axis]
    if x.shape[-1] != k:
        raise ValueError(f"qlinear: x has {x.shape[-1]} features, the weight takes {k}")
    n = q.shape[-1 - (q.axis == -1)]
    if out_tile is None or out_tile >= n:
        return _product(x, q)
    if n % out_tile:
        raise ValueError(f"qlinear: out_tile {out_tile} does not divide the {n} output channels")
    out_axis = 1 if q.axis == -2 else 0

    def tile(i):
        def part(a):
            return None if a is None else jax.lax.dynamic_slice_in_dim(a, i * out_tile, out_tile, out_axis)
        return _product(x, QArray(part(q.values), part(q.scales), part(q.mins), q.format, q.group_size, q.axis))

    y = jax.lax.map(tile, jnp.arange(n // out_tile))  # (n / T, ..., T)
    return jnp.moveaxis(y, 0, -2).reshape(*x.shape[:-1], n)


# --- A model's parameters -------------------------------------------------------------------------

# The tables a format leaves at 8 bits: the embedding (looked up a row at a time, so its width only
# costs memory) and the output head, which every token's logits read whole. At 4 bits the head's
# rounding moves every logit; int8 per channel keeps it close (the same choice as llama.cpp's
# Q4 files, whose token_embd/output are Q8_0 or Q6_K).
TABLE_FORMAT = {"int8": "int8", "int4": "int8", "fp8": "fp8"}
# A model's int4 weights get a minimum per group (GGUF Q4_1's form; torchao's and gpt-fast's int4
# weight-only keep a zero point per group too): 16 levels over [min, max] instead of 15 over
# [-absmax, absmax], for half a bit more per weight. On SmolLM2 (whose float weights are Q4_1's grid)
# symmetric rounding lost 35% perplexity, with minimums 0.1% (docs/QUANTIZATION.md).
MODEL_INT4_MINS = True


def quantization_plan(paths, fmt: str, linear_names) -> dict[tuple[str, ...], tuple[str, int]]:
    """What quantizing a model to `fmt` does to each parameter path (tuples, as in the stored
    layout): path -> (format, input axis) for the linear weights named in `linear_names` ([L, in,
    out]: axis -2), the embedding ([V, D]: axis -1, the tied head reads it [out, in]) and the
    output head; norm weights are not in it (they stay float)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize must be one of {', '.join(FORMATS)}, got {fmt!r}")
    plan = {}
    for path in paths:
        if path[0] == "layers" and path[-1] in linear_names:
            plan[path] = (fmt, -2)
        elif path == ("tok_embeddings",):
            plan[path] = (TABLE_FORMAT[fmt], -1)
        elif path == ("output",):
            plan[path] = (TABLE_FORMAT[fmt], -2)
    return plan


def quantize_weight(name: str, w, fmt: str, axis: int) -> QArray:
    """w quantized as a model's weight: `quantize` with its defaults, int4 with minimums
    (MODEL_INT4_MINS); a ValueError naming the weight when its input axis does not split into
    groups."""
    group = INT4_GROUP if fmt == "int4" else None
    if group and w.shape[axis] % group:
        raise ValueError(f"quantize {fmt}: {name} has {w.shape[axis]} inputs, not a multiple of the group size {group}")
    return quantize(w, fmt, axis=axis, asymmetric=fmt == "int4" and MODEL_INT4_MINS)


def quantize_params(params: dict, fmt: str, linear_names, *, release: bool = False) -> dict:
    """A model's parameters (a nested dict in the stored layout) quantized as `quantization_plan`
    says, round to nearest. QArrays already there are kept as they are (a GGUF's own blocks). One
    weight at a time; with release=True (the caller owns the tree) each float device array is
    deleted once quantized, so the peak is the quantized model plus one float weight."""
    def walk(tree, prefix):
        return {k: walk(v, prefix + (k,)) if isinstance(v, dict) else one(prefix + (k,), v) for k, v in tree.items()}

    def one(path, w):
        if path not in plan or isinstance(w, QArray):
            return w
        q = quantize_weight(".".join(path), w, *plan[path])
        if release and isinstance(w, jax.Array):
            w.delete()
        return q

    plan = quantization_plan(_paths(params), fmt, linear_names)
    return walk(params, ())


def _paths(tree: dict, prefix=()) -> list[tuple[str, ...]]:
    return [p for k, v in tree.items() for p in (_paths(v, prefix + (k,)) if isinstance(v, dict) else [prefix + (k,)])]


def dequantize_params(params: dict, dtype) -> dict:
    """Every QArray in a parameter tree dequantized to `dtype` (full fine-tuning of a quantized
    checkpoint trains the float weights it stands for)."""
    return jax.tree.map(lambda a: dequantize(a, dtype) if isinstance(a, QArray) else a, params,
                        is_leaf=lambda a: isinstance(a, QArray))


def describe(params) -> str:
    """The weights' storage in a few words, e.g. "int4 (groups of 32, with minimums): 210 weights,
    int8 (groups of 32): 1 weight, float32: 61 arrays"."""
    kinds: dict[str, int] = {}
    for a in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QArray)):
        if isinstance(a, QArray):
            groups = f"groups of {a.group_size}" if a.group_size else "per channel"
            kind = f"{a.format} ({groups}{', with minimums' if a.mins is not None else ''})"
        else:
            kind = np.dtype(a.dtype).name
        kinds[kind] = kinds.get(kind, 0) + 1
    noun = lambda k, n: ("array" if "(" not in k else "weight") + ("s" if n != 1 else "")  # noqa: E731
    return ", ".join(f"{k}: {n} {noun(k, n)}" for k, n in kinds.items())


def is_quantized(params: dict) -> bool:
    return any(isinstance(a, QArray) for a in jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, QArray)))


# --- Stored ---------------------------------------------------------------------------------------

PARTS = ("values", "scales", "mins")


@dataclasses.dataclass(frozen=True)
class QSpec:
    """What a checkpoint records of a QArray beside its arrays (docs/CHECKPOINT_FORMAT.md): enough
    to lay out its parts before any is read, and to rebuild it after."""

    format: str
    group_size: int | None
    axis: int
    scale_dtype: str
    has_mins: bool

    @classmethod
    def of(cls, q: QArray) -> "QSpec":
        return cls(q.format, q.group_size, q.axis, np.dtype(q.scales.dtype).name, q.mins is not None)

    @classmethod
    def quantized(cls, fmt: str, axis: int = -2) -> "QSpec":
        """The spec of `quantize_weight(..., fmt, axis)`, read off a traced call."""
        return cls.of(jax.eval_shape(lambda w: quantize_weight("", w, fmt, axis), jax.ShapeDtypeStruct((64, 64), jnp.float32)))

    def parts(self, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """The stored parts of a QArray of logical `shape`: name -> (shape, dtype)."""
        k, shape = shape[self.axis], list(shape)
        groups = _groups(k, self.group_size, self.format)
        values = list(shape)
        if self.format == "int4":
            values[self.axis] //= 2
        value_dtype = {"int8": np.int8, "int4": np.uint8, "fp8": np.dtype(_FP8)}[self.format]
        scales = list(shape)
        scales[self.axis] = groups
        out = {"values": (tuple(values), np.dtype(value_dtype)), "scales": (tuple(scales), np.dtype(self.scale_dtype))}
        if self.has_mins:
            out["mins"] = (tuple(scales), np.dtype(self.scale_dtype))
        return out

    def build(self, parts: dict) -> QArray:
        return QArray(parts["values"], parts["scales"], parts.get("mins"), self.format, self.group_size, self.axis)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "QSpec":
        return cls(**d)


def parts(q: QArray) -> dict:
    """A QArray's stored parts by name (mins only where it has them)."""
    return {name: a for name, a in zip(PARTS, (q.values, q.scales, q.mins)) if a is not None}


# --- GGUF blocks, kept ----------------------------------------------------------------------------

# GGML type name -> (bytes per block of 32, our format, has a min). Blocks run along the input.
GGUF_BLOCKS = {"Q8_0": (34, "int8", False), "Q4_0": (18, "int4", False), "Q4_1": (20, "int4", True)}
GGUF_BLOCK = 32


def gguf_block_array(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """A GGUF tensor's raw bytes (any uint8 view of them, e.g. `ReaderTensor.data`) -> blocks
    [out, in / 32, bytes per block], uint8. shape: (out, in), numpy order (GGUF lists it reversed).
    Rows are whole blocks, so llama.cpp's q/k row permutation can be undone on this array
    (gguf_io._reverse_permute works on its first axis) before `from_gguf`."""
    if type_name not in GGUF_BLOCKS:
        raise ValueError(f"GGUF type {type_name} is not kept quantized (kept: {', '.join(GGUF_BLOCKS)})")
    out, k = shape
    if k % GGUF_BLOCK:
        raise ValueError(f"GGUF {type_name} tensor of shape {shape}: input axis not a multiple of {GGUF_BLOCK}")
    nbytes = GGUF_BLOCKS[type_name][0]
    raw = np.asarray(data).view(np.uint8).reshape(-1)
    if raw.size != out * (k // GGUF_BLOCK) * nbytes:
        raise ValueError(f"GGUF {type_name} tensor of shape {shape}: {raw.size} bytes, expected "
                         f"{out * (k // GGUF_BLOCK) * nbytes}")
    return raw.reshape(out, k // GGUF_BLOCK, nbytes)


def from_gguf(type_name: str, blocks: np.ndarray, *, transposed: bool = False) -> QArray:
    """GGUF Q8_0 / Q4_0 / Q4_1 blocks [out, in / 32, bytes] (`gguf_block_array`) -> a QArray of
    numpy arrays, nothing dequantized: Q8_0 (f16 d, 32 int8) -> int8, group 32, value = q * d;
    Q4_0 (f16 d, 16 bytes of nibbles) -> int4, value = (nibble - 8) * d; Q4_1 (f16 d, f16 m,
    nibbles) -> int4 with mins, value = nibble * d + m. Scales and mins stay float16, the nibbles
    keep their bytes. The result is in our stored layout [in, out] (axis -2), or GGUF's own
    [out, in] (axis -1) with transposed=True."""
    if type_name not in GGUF_BLOCKS:
        raise ValueError(f"GGUF type {type_name} is not kept quantized (kept: {', '.join(GGUF_BLOCKS)})")
    nbytes, fmt, has_min = GGUF_BLOCKS[type_name]
    if blocks.dtype != np.uint8 or blocks.ndim != 3 or blocks.shape[-1] != nbytes:
        raise ValueError(f"GGUF {type_name}: blocks must be uint8 [out, in / 32, {nbytes}], got "
                         f"{blocks.dtype} {blocks.shape}")
    out, n_blocks, _ = blocks.shape
    blocks = np.ascontiguousarray(blocks)
    scales = blocks[..., 0:2].view(np.float16)[..., 0]  # (out, in / 32)
    mins = blocks[..., 2:4].view(np.float16)[..., 0] if has_min else None
    payload = blocks[..., 4 if has_min else 2:]
    if fmt == "int8":
        values = payload.view(np.int8).reshape(out, n_blocks * GGUF_BLOCK)
    else:  # the block's 16 bytes, in order: byte j = value j | value j + 16 << 4, our packing
        values = payload.reshape(out, n_blocks * GGUF_BLOCK // 2)
    q = QArray(values.copy(), scales.copy(), None if mins is None else mins.copy(), fmt, GGUF_BLOCK, -1)
    if transposed:
        return q
    q = transpose(q)
    return QArray(*(None if a is None else np.ascontiguousarray(a) for a in (q.values, q.scales, q.mins)),
                  q.format, q.group_size, q.axis)


__all__ = ["FORMATS", "GGUF_BLOCKS", "PARTS", "QArray", "QSpec", "concatenate_out", "dequantize", "describe", "dequantize_params",
           "from_gguf", "gguf_block_array", "is_quantized", "parts", "qlinear", "quantization_plan", "quantize",
           "quantize_params", "quantize_weight", "split_out", "take_rows", "transpose"]
