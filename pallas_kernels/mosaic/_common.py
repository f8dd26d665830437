"""What the Mosaic GPU kernels share: register layouts that the interpreter and the compiler both
accept, wgmma into fresh or running accumulators, the TMA producer's ring loop, shared memory with
wgmma's transforms, and `launch`, a warp-specialized plgpu.kernel that runs compiled or in the
interpreter (see flash_attention's docstring for what the interpreter accepts)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

# 16-bit operands in shared memory as wgmma reads them: (8, 64) tiles, 128-byte swizzle.
MMA_TRANSFORMS = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


class Regs:
    """Register values in the layouts wgmma gives and takes. The compiled kernel names the layout of
    every value it makes (a zero accumulator, an iota, a row vector read from shared memory); the
    interpreter computes with plain arrays and rejects layout casts, so there the names are left out.
    Layouts do not change a value, only where its elements live."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def _cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def zeros(self, shape):
        """f32 zeros laid out as a wgmma accumulator (2D) or one of its row statistics (1D)."""
        layout = plgpu.Layout.WGMMA if len(shape) == 2 else plgpu.Layout.WGMMA.reduce(1)
        return self._cast(jnp.zeros(shape, jnp.float32), layout)

    def full_rows(self, n, value):
        return self._cast(jnp.full((n,), value, jnp.float32), plgpu.Layout.WGMMA.reduce(1))

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def load(self, ref, along: int):
        """A vector from shared memory that indexes axis `along` of a wgmma result (0: rows)."""
        if self.interpret:
            return ref[...]
        return plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(1 - along))


def mma(a_ref, b_ref, shape):
    """a @ b (both in shared memory) into a fresh f32 accumulator, returned in registers."""
    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
        return acc_ref[...]
    return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def mma_add(regs, acc, a_ref, b_ref):
    """acc + a @ b. Compiled: wgmma accumulates into acc in place (no second accumulator's worth of
    registers: dk and dv at head dim 128 spill without this). Interpreted: a fresh accumulator
    added in registers (the interpreter has no `run_state`). Same sums, in f32 either way."""
    if regs.interpret:
        return acc + mma(a_ref, b_ref, acc.shape)

    def body(acc_ref):
        plgpu.wgmma(acc_ref, a_ref, b_ref)
    return pl.run_state(body)(plgpu.ACC.init(acc))


def spread(x, shape, dim):
    """A vector along axis `dim` of a 2D tile, broadcast over the other axis."""
    return lax.broadcast_in_dim(x, shape, [dim])


def produce(ranges, loaded, consumed, depth):
    """The TMA warpgroup's loop. ranges: [(lo, hi, copies)], run in order; copies(i, slot, barrier)
    issues step i's copies into ring slot `slot`, refilled only once both consumers released it."""
    def step(i, t, copies):
        slot = lax.rem(t, depth)

        @pl.when(t >= depth)
        def _():
            plgpu.barrier_wait(consumed.at[slot])
        copies(i, slot, loaded.at[slot])
        return t + 1

    t = jnp.int32(0)
    for lo, hi, copies in ranges:
        t = lax.fori_loop(lo, hi, functools.partial(step, copies=copies), t)

    # Wait out the last slots' releases too: a thread that waits on a barrier must see every phase
    # of it (the interpreter checks; on the GPU this only delays the producer's exit).
    @functools.partial(lax.fori_loop, jnp.maximum(t - depth, 0), t, init_val=None)
    def _(u, _):
        plgpu.barrier_wait(consumed.at[lax.rem(u, depth)])


def interpreter(detect_races: bool = False):
    """The Mosaic GPU interpreter, as `interpret=` takes it (shared memory, TMA, wgmma and barriers
    simulated on CPU; with detect_races, a happens-before race detector that prints "RACE DETECTED").

    A private import, kept here alone: in jax 0.10.2 `plgpu.kernel(..., interpret=True)` selects the
    generic Pallas HLO interpreter, which cannot run warp-specialized kernels ("run_scoped interpret
    rule does not support collective axes"); the GPU interpreter is selected by an
    `InterpretGPUParams`, which jax 0.10.2 exports only from `jax._src`."""
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams(detect_races=detect_races)


def smem(shape, dtype, mma=False):
    return plgpu.SMEM(shape, dtype, transforms=MMA_TRANSFORMS if mma else ())


def launch(kernel, name, grid, grid_names, out_type, scratch, interpret, *, wgs, **params):
    """plgpu.kernel with `wgs` compute warpgroups and one TMA warpgroup per CTA."""
    call = plgpu.kernel(
        functools.partial(kernel, wgs=wgs, regs=Regs(interpret is not False), **params),
        out_type=out_type,
        scratch_types=scratch,
        grid=grid,
        grid_names=grid_names,
        num_threads=wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpreter() if interpret is True else interpret,
        kernel_name=name,
    )
    if interpret is False:
        return call
    # The interpreter drives its simulated GPU through ordered host callbacks, an effect that the
    # compiled branch of `lax.platform_dependent` lacks: lowering that cond for CUDA fails
    # ("Lowering rule for `cond` returns incorrect set of output tokens"). Run inside a pure host
    # callback, the interpreted kernel is an effect-free computation like the compiled one.
    interpreted = jax.jit(call)
    return lambda *args: jax.pure_callback(
        lambda *a: jax.tree.map(np.asarray, interpreted(*a)), out_type, *args)
