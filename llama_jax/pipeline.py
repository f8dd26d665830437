"""Pipeline parallelism over the mesh's stage axis: GPipe for the stacked layers (issue #14).

Stage s holds layers [s*L/S, (s+1)*L/S): its shard of the stacked layer weights [L, ...], which
llama_jax.sharding already splits over the stage axis. The batch is cut into M micro-batches; stage
s runs its layers on micro-batch m at tick m + s and hands the activations to stage s + 1 with one
`ppermute`, so the whole batch takes M + S - 1 ticks, of which each stage idles S - 1 (the bubble,
Huang et al. 2019, arXiv:1811.06965). The backward is jax's transpose of that loop: the same
schedule run in reverse, activations of every tick kept (wrap the body in jax.checkpoint to keep
only the stage inputs).

The schedule is a `jax.shard_map` manual over the stage axis and the pure data-parallel axes
(sharding.data_axes: each device then sums its weight gradients once, where the pipeline ends);
the other axes stay Auto, so inside a stage XLA still partitions the body by FSDP, context and
tensor parallelism, and the body may call `jax.shard_map` itself (llama_jax.ops does, for its
Pallas kernels; sharding leaves the manual axes out of its specs). Every stage
computes at every tick, on a stale micro-batch during its bubble, and that result is dropped: the
SPMD form of GPipe, with no control flow that differs between devices.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from llama_jax import sharding
from llama_jax.model import scan_layers

SCHEDULES = ("gpipe",)


def bubble_fraction(stages: int, micro_batches: int, schedule: str = "gpipe") -> float:
    """The fraction of the schedule's stage-ticks spent idle: (S - 1) / (M + S - 1) for GPipe (every
    stage is busy M of the M + S - 1 ticks; the backward pass has the same shape)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}; known: {list(SCHEDULES)}")
    if stages < 1 or micro_batches < 1:
        raise ValueError(f"stages ({stages}) and micro_batches ({micro_batches}) must be positive")
    return (stages - 1) / (micro_batches + stages - 1)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check(n_layers: int, stages: int, batch: int, micro_batches: int) -> None:
    """Raises ValueError, naming the numbers that work, unless the stages divide the layers, the
    micro-batches divide the batch, and there are at least as many micro-batches as stages."""
    for name, value in dict(n_layers=n_layers, stages=stages, batch=batch, micro_batches=micro_batches).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"pipeline {name}={value!r}: must be a positive integer")
    if n_layers % stages:
        raise ValueError(f"{n_layers} layers do not split into {stages} pipeline stages; "
                         f"stage counts that work: {_divisors(n_layers)}")
    fits = [m for m in _divisors(batch) if m >= stages]
    if batch % micro_batches or micro_batches < stages:
        why = (f"do not divide the batch of {batch}" if batch % micro_batches
               else f"are fewer than the {stages} stages (each stage needs one in flight)")
        if not fits:
            raise ValueError(f"{micro_batches} micro-batches {why}; a batch of {batch} rows is too small for "
                             f"{stages} stages: it needs at least {stages} rows")
        raise ValueError(f"{micro_batches} micro-batches {why}; micro-batch counts that work for a batch of "
                         f"{batch} on {stages} stages: {fits}")


def default_micro_batches(batch: int, stages: int, data: int = 1) -> int:
    """The smallest divisor of `batch` that is >= 2 * stages (bubble at most about a third), else the
    smallest that is >= stages; among them, first those whose micro-batches the `data`-parallel
    devices divide (then each device sums its weight gradients once per step, not once per tick:
    see `pipeline`). ValueError when the batch has fewer rows than there are stages."""
    if stages < 1 or batch < 1:
        raise ValueError(f"batch ({batch}) and stages ({stages}) must be positive")
    for split in ((lambda m: (batch // m) % data == 0), (lambda m: True)):
        for least in (2 * stages, stages):
            fits = [m for m in _divisors(batch) if m >= least and split(m)]
            if fits:
                return fits[0]
    raise ValueError(f"a batch of {batch} rows is too small for {stages} pipeline stages: each stage needs "
                     f"a micro-batch of at least one row in flight, so the batch needs at least {stages} rows")


def _data_parallel(mesh) -> int:
    """How many devices split the batch and nothing else (sharding.data_axes)."""
    return math.prod(mesh.shape[a] for a in sharding.data_axes(mesh))


def micro_batch_count(mesh, n_layers: int, batch: int, micro_batches: int | None = None) -> int | None:
    """The micro-batches a batch of `batch` rows flows through the stages of `mesh` in: None when the
    mesh has no stages (no pipeline); else micro_batches, or default_micro_batches(batch, S, dp),
    checked (ValueError naming the counts that work)."""
    stages = 1 if mesh is None or mesh.empty else sharding.axis_size("layers", mesh)
    if stages == 1:
        return None
    m = micro_batches or default_micro_batches(batch, stages, _data_parallel(mesh))
    check(n_layers, stages, batch, m)
    return m


def _leading(tree, what: str) -> int:
    sizes = {a.shape[0] for a in jax.tree.leaves(tree)}
    if len(sizes) != 1:
        raise ValueError(f"pipeline: every leaf of {what} needs the same leading axis, got sizes {sorted(sizes)}")
    return sizes.pop()


def pipeline(body, stream, layers, per_row, *, micro_batches: int | None = None):
    """Runs `body` over the L stacked layers in order on the whole batch,
        for l in range(L): stream = body(stream, layers[l], per_row)
    pipelined over the active mesh's stage axis (GPipe).

    body(stream, layer, per_row) -> stream: one layer; stream and per_row are pytrees of arrays
    [b, ...] of one micro-batch, layer one slice of `layers`. stream: pytree of [B, ...] arrays (the
    activations handed from layer to layer). layers: pytree of stacked [L, ...] arrays (an nnx
    State works), best already split over the stage axis (llama_jax.sharding.place does). per_row:
    pytree of [B, ...] arrays that each micro-batch needs as well (RoPE cos/sin, segment ids,
    positions), sliced per micro-batch and never sent between stages; None leaves are kept.
    Micro-batch m is rows m, m + M, m + 2M, ... (a strided split keeps every micro-batch spread
    over the data-parallel devices when B / M is a multiple of their count); the body must treat
    rows independently, as a transformer layer does. micro_batches: M, or None for
    default_micro_batches(B, S, dp). Returns the final stream [B, ...].

    Without a mesh, or with one stage, this is one lax.scan over the layers and micro_batches is
    ignored. Differentiable: the backward runs the schedule in reverse."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or sharding.axis_size("layers", mesh) == 1:
        return scan_layers(body, stream, layers, per_row)
    stages = sharding.axis_size("layers", mesh)
    n_layers, batch = _leading(layers, "layers"), _leading(stream, "stream")
    if jax.tree.leaves(per_row) and _leading(per_row, "per_row") != batch:
        raise ValueError(f"pipeline: per_row has {_leading(per_row, 'per_row')} rows, the stream {batch}")
    m = micro_batch_count(mesh, n_layers, batch, micro_batches)
    axis = sharding.spec(("layers",), mesh)[0]  # the stage axis, by its rule

    def split(a):  # (B, ...) -> (M, B/M, ...): micro-batch i is rows i, i + M, ...
        return jnp.moveaxis(a.reshape(batch // m, m, *a.shape[1:]), 1, 0)

    def join(a):  # (M, B/M, ...) -> (B, ...)
        return jnp.moveaxis(a, 0, 1).reshape(batch, *a.shape[2:])

    def staged(stream, layers, per_row):
        """One stage: stream and per_row [M, B/M, ...] whole, layers its own [L/S, ...]."""
        s = jax.lax.axis_index(axis)
        at = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        # Stage s + 1 receives what stage s sent; the last stage's output leaves the pipeline.
        send = [(i, i + 1) for i in range(stages - 1)]

        def tick(held, t):
            # Stage 0 takes micro-batch t fresh; the others what their predecessor sent last tick.
            x = jax.tree.map(lambda new, old: jnp.where(s == 0, new, old), at(stream, jnp.minimum(t, m - 1)), held)
            # This stage works on micro-batch t - s (a stale one, dropped, in its bubble).
            y = scan_layers(body, x, layers, at(per_row, jnp.clip(t - s, 0, m - 1)))
            return jax.tree.map(lambda a: jax.lax.ppermute(a, axis, send), y), y

        # The carry starts as real rows (micro-batch 0), so bubble ticks compute on finite values.
        _, ys = jax.lax.scan(tick, at(stream, 0), jnp.arange(m + stages - 1))
        # On the last stage, tick t finished micro-batch t - (S - 1).
        return jax.tree.map(lambda a: a[stages - 1:][None], ys)  # (1, M, B/M, ...) per stage

    spec = jax.sharding.PartitionSpec
    # Manual over the stage axis and the pure data-parallel axes (jax 0.10.2: axis_names=); fsdp,
    # context and model stay Auto. Manual over the data axes, each device's weight gradient is
    # summed over them once, where the shard_map ends; left Auto, XLA all-reduces every layer's
    # gradient inside the tick loop, M + S - 1 times per step (read from the HLO, CPU and H100).
    data = sharding.data_axes(mesh)
    if (batch // m) % _data_parallel(mesh):
        data = ()  # micro-batches the data axes do not divide: those axes stay Auto
    rows = spec(None, data if len(data) != 1 else data[0]) if data else spec()
    # check_vma=False: with it on, a loop in the body whose carry starts from a constant (the
    # blocked attention's fori_loop) or a nested shard_map with check_vma=False (ops' Pallas
    # kernels) fails to type-check as varying over the stage axis. Gradients are right without it.
    out = jax.shard_map(
        staged,
        in_specs=(rows, spec(axis), rows),
        out_specs=spec(axis, *rows),
        axis_names={axis, *data},
        check_vma=False,
    )(jax.tree.map(split, stream), layers, jax.tree.map(split, per_row))
    return jax.tree.map(lambda a: join(a[-1]), out)  # the last stage's (S, M, B/M, ...) -> (B, ...)
