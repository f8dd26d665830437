"""Sharding over one named mesh, declared once: the only file that names mesh axes.

The mesh has five axes, outermost first: 'stage' (pipeline stages), 'data' (data parallel), 'fsdp'
(data parallel with the weights, gradients and optimizer state split as well: ZeRO-3), 'context'
(the sequence split over devices) and 'model' (tensor parallel). An axis of size 1 costs nothing, so
`make_mesh(dp, tp)` is the ('data', 'model') mesh inference has always used.

Every parameter, the KV cache and the activations that kernels see carry logical axis names
(llama_jax.model, llama_jax.ops); AXIS_RULES maps them onto the mesh, Megatron style: wq, wk, wv,
w1, w3 split by output features over 'model', wo and w2 by input features, the embedding and output
head by vocabulary; the model dimension of every weight over 'fsdp' (XLA gathers a layer's weights
where they are used); stacked layers over 'stage'; norms replicated. Activations and the KV cache
are split by batch over 'data' and 'fsdp', by heads over 'model', and by sequence over 'context'.
The model itself knows nothing of this. docs/SHARDING.md has the table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from llama_jax.config import LlamaConfig

MESH_AXES = ("stage", "data", "fsdp", "context", "model")

# Logical axis -> mesh axis, axes (split over their product, in order), or None (replicated).
AXIS_RULES: dict[str, str | tuple[str, ...] | None] = {
    # Parameters
    "vocab": "model",
    "q_heads": "model",  # wq's and wo's H*E features; the H axis of queries and outputs
    "kv_heads": "model",  # wk's and wv's K*E features; the K axis of keys, values and the cache
    "ffn": "model",
    "embed": "fsdp",  # the model dimension D of weights (ZeRO-3); never of activations
    "norm": None,
    "fused": None,  # the concatenated outputs of a fused layout (llama_jax.model.Layout): never under a mesh
    "layers": "stage",
    # Activations and the cache
    "batch": ("data", "fsdp"),
    "seq": "context",  # the T axis of activations
    "kv_seq": None,  # the S axis of gathered keys and the cache
    "act_embed": None,  # the D axis of activations
    "head_dim": None,
}
PARAM_AXES = ("vocab", "q_heads", "kv_heads", "ffn", "embed", "norm", "fused", "layers")  # the logical axes of weights

# The logical axes of the activations and caches the model, its kernels and the context-parallel
# attention see; the model, llama_jax.ops and llama_jax.context_parallel name them from here.
ROWS = ("batch", "seq", "act_embed")  # activations [B, T, D]
HEADS = ("batch", "seq", "q_heads", "head_dim")  # queries and attention outputs [B, T, H, E]
KV = ("batch", "seq", "kv_heads", "head_dim")  # a chunk's own keys and values [B, T, K, E]
CACHE_AXES = ("batch", "kv_seq", "kv_heads", "head_dim")  # gathered keys and values, the KV cache [B, S, K, E]
DECODE_Q = ("batch", "q_heads", "head_dim")  # one query per sequence [B, H, E]
TOKENS = ("batch", "seq")  # token-shaped ints: segment ids [B, T]
PER_ROW = ("batch",)  # one number per sequence: lengths, offsets [B]
PAGE_AXES = (None, None, "kv_heads", "head_dim")  # a paged KV cache's pool [P, block_size, K, E]
BLOCK_TABLE = ("batch", None)  # each sequence's block ids [B, max_blocks]


def make_mesh(dp: int = 1, tp: int | None = None, fsdp: int = 1, cp: int = 1, pp: int = 1) -> Mesh:
    """A mesh of pp x dp x fsdp x cp x tp devices over MESH_AXES; tp defaults to the devices left
    over. Raises ValueError, naming the sizes that fit, when the product is not the device count's
    divisor or is bigger than it."""
    n = jax.device_count()
    sizes = dict(pp=pp, dp=dp, fsdp=fsdp, cp=cp)
    for name, size in sizes.items():
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"mesh {name}={size!r}: must be a positive integer")
    rest = math.prod(sizes.values())
    shown = " x ".join(f"{k}={v}" for k, v in sizes.items() if v > 1 or k == "dp")
    if tp is None:
        if n % rest:
            raise ValueError(f"mesh {shown} = {rest} devices does not divide the {n} devices available")
        tp = n // rest
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"mesh tp={tp!r}: must be a positive integer")
    if rest * tp > n:
        raise ValueError(f"mesh {shown} x tp={tp} = {rest * tp} devices is bigger than the {n} devices available")
    # Auto axes: shardings propagate through jit as in GSPMD, and shard_map accepts any input.
    return jax.make_mesh((pp, dp, fsdp, cp, tp), MESH_AXES, axis_types=(AxisType.Auto,) * 5,
                         devices=jax.devices()[: rest * tp])


def _mesh_axes(name: str | None) -> tuple[str, ...]:
    """The mesh axes a logical axis is split over (empty: replicated)."""
    if name is None:
        return ()
    if name not in AXIS_RULES:
        raise ValueError(f"no sharding rule for logical axis {name!r}")
    target = AXIS_RULES[name]
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def _entry(axes: tuple[str, ...]):
    """A PartitionSpec entry for mesh axes: None, one name, or a tuple of names."""
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _splits(mesh, m: str) -> bool:
    """Whether mesh axis m splits arrays here: the mesh has it at size > 1, and it is not already
    manual (inside a shard_map over it, such as the pipeline's, arrays are per-device already)."""
    return mesh.shape.get(m, 1) > 1 and m not in (getattr(mesh, "manual_axes", None) or ())


def spec(axes: tuple[str | None, ...], mesh=None) -> P:
    """The PartitionSpec of an activation with these logical axes on `mesh` (default: the active
    one); mesh axes the mesh lacks, has at size 1, or has manual already are left out."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return P(*(_entry(tuple(m for m in _mesh_axes(a) if _splits(mesh, m))) for a in axes))


def data_axes(mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch and nothing else (no parameter is split over them), at
    size > 1: pure data parallelism, where each device holds whole weights."""
    params = {m for name in PARAM_AXES for m in _mesh_axes(name)}
    return tuple(m for m in _mesh_axes("batch") if m not in params and _splits(mesh, m))


def axis_size(name: str, mesh: Mesh) -> int:
    """How many ways the mesh splits the logical axis `name` (1 when it is not split)."""
    return math.prod(mesh.shape.get(m, 1) for m in _mesh_axes(name))


def on_mesh(mesh: Mesh | None):
    """The context jitted calls run in: the mesh, or nothing."""
    return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def no_mesh():
    """A context with no active mesh, even inside a jitted function traced under one (nnx.eval_shape
    would otherwise read the model's logical axis names as mesh axes)."""
    return jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ()))


def placement(mesh: Mesh | None):
    """None without a mesh; else a function (logical axes, shape) -> NamedSharding, for arrays the
    model creates (the KV cache)."""
    if mesh is None:
        return None
    return lambda axes, shape: NamedSharding(mesh, logical_to_mesh(tuple(axes), tuple(shape), mesh))


def batch_sharding(mesh: Mesh | None, ndim: int):
    """Where a host batch [B, ...] goes: split by batch on the mesh, or the default device."""
    return None if mesh is None else NamedSharding(mesh, spec(("batch",) + (None,) * (ndim - 1), mesh))


def check_batch(mesh: Mesh | None, b: int) -> None:
    n = 1 if mesh is None else axis_size("batch", mesh)
    if b % n:
        raise ValueError(f"batch of {b} is not divisible by the mesh's data axis (dp={n})")


def logical_to_mesh(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> P:
    """The mesh PartitionSpec for logical axes. Mesh axes the mesh lacks or has at size 1 are left
    out; an axis its mesh axes do not divide is replicated (e.g. a 49152 vocabulary over tp=9)."""
    out, used = [], set()
    for name, size in zip(axes, shape):
        targets = tuple(m for m in _mesh_axes(name) if _splits(mesh, m))
        clash = used.intersection(targets)
        if clash:
            raise ValueError(f"logical axes {axes} put two axes on mesh axis {sorted(clash)[0]!r}")
        if targets and size % math.prod(mesh.shape[m] for m in targets) == 0:
            used.update(targets)
            out.append(_entry(targets))
        else:
            out.append(None)
    return P(*out)


def kv_replication(config: LlamaConfig, tp: int) -> int:
    """How many times each KV head is repeated so that tp devices (axis_size("kv_heads", mesh))
    each hold whole heads: 1 when tp divides n_kv_heads, tp // n_kv_heads when n_kv_heads divides
    tp. Anything else is refused, naming the tp values that work."""
    h, k = config.n_heads, config.n_kv_heads
    if h % tp == 0 and k % tp == 0:
        return 1
    if h % tp == 0 and tp % k == 0:
        return tp // k
    good = [t for t in range(1, h + 1) if h % t == 0 and (k % t == 0 or t % k == 0)]
    raise ValueError(f"tp={tp} fits neither the {h} query heads and {k} KV heads nor KV-head replication; "
                     f"tp values that work: {good}")


def replicate_kv_heads(config: LlamaConfig, params: dict, r: int) -> tuple[LlamaConfig, dict]:
    """Repeats each KV head r times in wk and wv ([L, D, K*E] -> [L, D, K*r*E]). Query head h used KV
    head h // G; with K*r heads and groups G/r it uses (h // (G/r)), the same head's copy."""
    if r == 1:
        return config, params
    e = config.head_dim

    def rep(w):  # (L, D, K*E) -> (L, D, K, r, E) -> (L, D, K*r*E)
        w = np.asarray(w)
        l, d, _ = w.shape
        w = w.reshape(l, d, config.n_kv_heads, 1, e)
        return np.broadcast_to(w, (l, d, config.n_kv_heads, r, e)).reshape(l, d, -1)

    attn = dict(params["layers"]["attention"], wk=rep(params["layers"]["attention"]["wk"]),
                wv=rep(params["layers"]["attention"]["wv"]))
    params = dict(params, layers=dict(params["layers"], attention=attn))
    return dataclasses.replace(config, n_kv_heads=config.n_kv_heads * r), params


def param_shardings(model: nnx.Module, mesh: Mesh) -> dict:
    """The NamedSharding of every parameter of a (possibly abstract) model, from its logical axes,
    as a nested dict like nnx.to_pure_dict's."""
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model)))
    shapes = nnx.to_pure_dict(nnx.state(model))
    return jax.tree.map(lambda spec, a: NamedSharding(mesh, logical_to_mesh(tuple(spec), a.shape, mesh)),
                        specs, shapes, is_leaf=lambda x: isinstance(x, P))


def place(model: nnx.Module, mesh: Mesh | None) -> None:
    """Puts every variable of the model on its sharding (or on the default device without a mesh),
    in place. Host (numpy) values are sliced per device, so no device holds a full copy of a split
    weight; this works across processes too."""
    for _, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Variable):
            continue
        value = var.get_value()
        if mesh is None:
            var.set_value(jax.device_put(value))
            continue
        axes = tuple(var.get_metadata().get("out_sharding") or (None,) * value.ndim)

        # A quantized weight's values, scales and mins each follow the weight's axes (each shard's
        # scales with its rows).
        def put(a, axes=axes):
            sharding = NamedSharding(mesh, logical_to_mesh(axes, np.shape(a), mesh))
            if isinstance(a, jax.Array):
                return jax.device_put(a, sharding)
            host = np.asarray(a)
            return jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
        var.set_value(jax.tree.map(put, value))


def replicated(x):
    """Constrains x to be replicated when a mesh is active, so every process can read it."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, P())
