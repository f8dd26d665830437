"""Converted checkpoints: an Orbax checkpoint of the params pytree beside `llama_config.json`.

Layout (docs/CHECKPOINT_FORMAT.md): `DIR/llama_config.json`, `DIR/params/` (Orbax, OCDBT), and the
tokenizer files. Reading goes through Orbax's standard restore with an abstract tree of
`jax.ShapeDtypeStruct(..., sharding=...)`, so on a mesh each device reads only its shard.

Writing streams: Orbax's normal save wants every array in memory, which a 70B model (141 GB in bf16)
does not fit on most hosts. `write_params` hands Orbax placeholder leaves (`_StreamedLeaf`) and a
type handler that opens each array's TensorStore with Orbax's own spec, chunked one layer (or less)
per chunk, then writes the tensors one at a time as the source yields them. Peak memory is one
tensor plus TensorStore's write buffers; the result is an ordinary Orbax checkpoint.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import shutil
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from orbax.checkpoint import future as ocp_future

from llama_jax.checkpoint import param_shapes, unflatten
from llama_jax.config import LlamaConfig
from llama_jax.quant import QArray, QSpec, parts as quantized_parts

CONFIG_FILE = "llama_config.json"
PARAMS_DIR = "params"
# Chunk target: a layer slice is split further until a chunk is at most this big, so a sharded
# restore reads little more than its shard, and no chunk straddles two layers (each layer's write
# then fills whole chunks: no read-modify-write, no chunk held in memory across tensors).
CHUNK_BYTES = 64 * 1024 * 1024


def is_converted(path: str | os.PathLike) -> bool:
    """Whether `path` is a converted checkpoint directory (llama_config.json and params/)."""
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


# The key of llama_config.json that names the dtype the parameters are stored in: a property of the
# checkpoint (how it runs is the RuntimeConfig's, chosen at load).
STORED_DTYPE = "param_dtype"
# The key that lists the weights stored quantized: "layers/attention/wq" -> its QSpec. Each such
# weight is a subtree of its parts (values, scales[, mins]) in params/, each in its own dtype.
QUANTIZED = "quantized"


def _read_json(path: str | os.PathLike) -> dict:
    where = os.path.join(os.fspath(path), CONFIG_FILE)
    try:
        with open(where) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: missing (not a converted checkpoint)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid ({e})") from None


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """The LlamaConfig stored in a converted checkpoint's llama_config.json."""
    try:
        return LlamaConfig.from_dict({k: v for k, v in _read_json(path).items() if k != QUANTIZED})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(os.fspath(path), CONFIG_FILE)}: invalid ({e})") from None


def stored_dtype(path: str | os.PathLike) -> str:
    """The dtype a converted checkpoint's parameters are stored in ("float32" when it does not say)."""
    return _read_json(path).get(STORED_DTYPE) or "float32"


def read_quantized(path: str | os.PathLike) -> dict[tuple[str, ...], QSpec]:
    """The weights a converted checkpoint stores quantized: our path -> QSpec (none: {})."""
    try:
        return {tuple(k.split("/")): QSpec.from_json(v) for k, v in _read_json(path).get(QUANTIZED, {}).items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"{os.path.join(os.fspath(path), CONFIG_FILE)}: invalid {QUANTIZED!r} ({e})") from None


def write_config(path: str | os.PathLike, config: LlamaConfig, dtype: str,
                 quantized: dict[tuple[str, ...], QSpec] | None = None) -> None:
    """llama_config.json: the architecture, the dtype the float parameters are stored in, and the
    weights stored quantized."""
    extra = {QUANTIZED: {"/".join(p): q.to_json() for p, q in quantized.items()}} if quantized else {}
    with open(os.path.join(os.fspath(path), CONFIG_FILE), "w") as f:
        json.dump({**config.to_dict(), STORED_DTYPE: jnp.dtype(dtype).name, **extra}, f, indent=2)
        f.write("\n")


def stored_leaves(config: LlamaConfig, dtype, quantized: dict[tuple[str, ...], QSpec] | None = None
                  ) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """Every array params/ holds: path -> (shape, dtype). A float parameter is stored in `dtype`; a
    quantized one as its parts, each at path + (part,) in its own dtype."""
    quantized = quantized or {}
    unknown = sorted(set(quantized) - set(param_shapes(config)))
    if unknown:
        raise ValueError(f"quantized weight {'/'.join(unknown[0])} is not a parameter of this model")
    out = {}
    for path, shape in param_shapes(config).items():
        if path in quantized:
            out.update({path + (name,): part for name, part in quantized[path].parts(shape).items()})
        else:
            out[path] = (tuple(shape), np.dtype(jnp.dtype(dtype)))
    return out


def read_converted(path: str | os.PathLike, *, dtype=None, shardings=None) -> tuple[LlamaConfig, dict]:
    """Reads a converted checkpoint: returns (config, params), params the nested dict of jax.Arrays
    that `read_hf_params` describes (layers stacked on axis 0).

    dtype: the parameter dtype to restore into ("float32"/"bfloat16"; None keeps the stored one).
    shardings: an optional pytree of
    jax.sharding.Sharding with the structure of params; each array is restored straight onto its
    sharding (each device reads only its part). Default: all on the first device.
    """
    path = os.path.abspath(os.fspath(path))
    if not is_converted(path):
        raise FileNotFoundError(f"{path}: not a converted checkpoint (no {CONFIG_FILE} and {PARAMS_DIR}/)")
    config = read_config(path)
    stored = jnp.dtype(stored_dtype(path))
    dtype = jnp.dtype(dtype or stored)
    quantized = read_quantized(path)
    shapes = param_shapes(config)
    if shardings is None:
        one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        flat_shardings = {p: one for p in shapes}
    else:
        flat_shardings = _flatten(shardings)
        if set(flat_shardings) != set(shapes):
            raise ValueError(f"shardings: structure differs from the params "
                             f"({sorted(set(flat_shardings) ^ set(shapes))[:3]} ...)")
    leaves = {}
    for leaf, (shape, leaf_dtype) in stored_leaves(config, stored, quantized).items():
        weight = leaf if leaf in shapes else leaf[:-1]  # a quantized part restores beside its weight
        leaves[leaf] = jax.ShapeDtypeStruct(shape, dtype if leaf in shapes else leaf_dtype,
                                            sharding=_part_sharding(flat_shardings[weight], shape))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_DIR), unflatten(leaves))
    flat = _flatten(params)
    for weight, spec in quantized.items():
        flat[weight] = spec.build({name: flat.pop(weight + (name,)) for name in spec.parts(shapes[weight])})
    return config, unflatten(flat)


def _part_sharding(s: jax.sharding.Sharding, shape: tuple[int, ...]) -> jax.sharding.Sharding:
    """A weight's sharding for one of its arrays (a quantized part may be shorter along the input:
    packed values, one scale per group): an axis it cannot split evenly stays whole."""
    if not isinstance(s, jax.sharding.NamedSharding):
        return s
    spec = []
    for i, axes in enumerate(tuple(s.spec) + (None,) * (len(shape) - len(s.spec))):
        names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n = int(np.prod([s.mesh.shape[a] for a in names])) if names else 1
        spec.append(axes if shape[i] % n == 0 else None)
    return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*spec))


def _flatten(tree: dict, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# ---------------------------------------------------------------------------------------------
# Streaming writer


@dataclasses.dataclass
class _StreamedLeaf:
    """Stands in for one array in the tree handed to Orbax; its data comes from `stream`."""

    path: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: np.dtype
    stream: "_Stream"

    @property
    def stacked(self) -> bool:
        return self.path[0] == "layers"


@dataclasses.dataclass
class _Stream:
    tensors: Iterable[tuple[tuple[str, ...], int | None, np.ndarray | QArray]]
    on_tensor: Callable[[np.ndarray], None] | None
    error: BaseException | None = None


async def write_tensor(store, layer: int | None, a: np.ndarray) -> None:
    """Writes one tensor (a layer slice of a stacked array, or a whole array) and waits for it.
    Module-level so tests can make it fail mid-way."""
    # We never touch `a` again, so TensorStore may encode straight from it instead of copying it.
    await (store if layer is None else store[layer]).write(a, can_reference_source_data_indefinitely=True)


class _StreamingHandler(ocp.type_handlers.NumpyHandler):
    """Saves `_StreamedLeaf`s as Orbax's NumpyHandler would save the arrays they stand for (same
    TensorStore spec, same 'np.ndarray' type string), writing tensors in the order the source yields
    them instead of whole arrays, so only one tensor is in memory at a time."""

    async def serialize(self, values, infos, args=None):
        streams = {id(v.stream) for v in values}
        if len(streams) != 1:
            raise ValueError("all streamed leaves of one save must share one stream")
        return [ocp_future.CommitFutureAwaitingContractedSignals(self._write_all(values, infos),
                                                                 name="llama_jax_streaming_write")]

    async def _write_all(self, values, infos):
        # Orbax runs this in its own thread and logs any exception with a traceback before
        # re-raising it; we hand the error to write_params instead, which raises it to the caller.
        try:
            await self._stream_all(values, infos)
        except Exception as e:  # noqa: BLE001
            values[0].stream.error = e

    async def _stream_all(self, values, infos):
        stores = {}
        for value, info in zip(values, infos):
            await info.await_path_creation()
            # One layer per chunk at most (then smaller, down to CHUNK_BYTES): Orbax picks chunks
            # that divide the "local shape" it is told is written at once.
            local = (1, *value.shape[1:]) if value.stacked else value.shape
            # Orbax's own spec builder (its public type_handlers API), so the arrays we write are
            # laid out exactly as its NumpyHandler would; OCDBT files are per process, as Orbax's.
            ocdbt = info.is_ocdbt_checkpoint
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=ocdbt, global_shape=value.shape, local_shape=local, dtype=value.dtype,
                process_index=jax.process_index() if ocdbt else None, metadata_key=self._metadata_key,
                arg=ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES))
            stores[value.path] = (await ts.open(ts.Spec(spec), create=True, open=True,
                                                context=info.ts_context), value)
        stream = values[0].stream
        written = {p: set() for p in stores}
        for path, layer, tensor in stream.tensors:
            arrays = ({path + (k,): a for k, a in quantized_parts(tensor).items()} if isinstance(tensor, QArray)
                      else {path: tensor})
            if not set(arrays) <= set(stores):
                raise ValueError(f"stream gave {'/'.join(path)} {'quantized' if isinstance(tensor, QArray) else 'as floats'}, "
                                 f"which the checkpoint's table does not hold so")
            for leaf, a in arrays.items():
                store, value = stores[leaf]
                await write_tensor(store, layer, np.ascontiguousarray(a, dtype=value.dtype))
                written[leaf].add(layer)
            if stream.on_tensor is not None:
                stream.on_tensor(tensor)
            del tensor, arrays
        for path, (_, value) in stores.items():  # every layer of every array, exactly once
            want = set(range(value.shape[0])) if value.stacked else {None}
            if written[path] != want:
                raise ValueError(f"stream wrote {'/'.join(path)} layers {sorted(written[path], key=str)}, "
                                 f"expected {sorted(want, key=str)}")


def write_params(directory: str | os.PathLike, config: LlamaConfig, dtype,
                 tensors: Iterable[tuple[tuple[str, ...], int | None, np.ndarray | QArray]], *,
                 on_tensor: Callable[[np.ndarray | QArray], None] | None = None,
                 quantized: dict[tuple[str, ...], QSpec] | None = None) -> None:
    """Writes the params of `config` as an Orbax checkpoint at `directory` (must not exist),
    streaming: `tensors` yields (our path, layer index or None, array in our layout) one at a time,
    each cast to `dtype` and written before the next is read; the weights in `quantized` come as
    QArrays (a layer's, for stacked ones) and are written as their parts. on_tensor(a) is called
    after each."""
    directory = os.path.abspath(os.fspath(directory))
    # Take the first tensor here, so a source that validates before yielding (names, shapes) fails
    # in the caller's thread, before Orbax starts.
    tensors = iter(tensors)
    first = next(tensors, None)
    stream = _Stream(itertools.chain([first] if first is not None else [], tensors), on_tensor)
    tree = unflatten({p: _StreamedLeaf(p, s, d, stream) for p, (s, d) in stored_leaves(config, dtype, quantized).items()})
    # jax.Array registered too, only because Orbax warns when a registry lacks it.
    registry = ocp.type_handlers.create_type_handler_registry(
        (_StreamedLeaf, _StreamingHandler()), (jax.Array, ocp.type_handlers.ArrayHandler()))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    try:
        with ocp.Checkpointer(handler) as ckptr:
            ckptr.save(directory, args=ocp.args.PyTreeSave(item=tree))
    except Exception:
        if stream.error is None:
            raise  # Orbax's own failure
        # else Orbax noticed the arrays we never finished ("params are missing"); ours is the cause
    if stream.error is not None:
        shutil.rmtree(directory, ignore_errors=True)  # Orbax finalized it, but it is incomplete
        raise stream.error
