"""The model's compute ops, one function per phase, dispatching to a kernel backend or to XLA:
`embed`, `linear`, `contract_rows`, `rms_norm`, `prefill_attention`, `decode_attention`,
`paged_decode_attention`.

The choices come from the RuntimeConfig, fixed when the program is built:
- `impl` (attention, norm): "auto" is pallas on GPU and xla elsewhere; on CPU "pallas" runs the
  kernels in interpret mode (slow, for tests). "xla" is the memory-bounded blocked attention in
  plain JAX (pallas_kernels/blocked_attention.py); "cudnn" is jax.nn.dot_product_attention's.
- `cpu_kernels` (True when the RuntimeConfig resolved it "on"): the optional C++ backend (the
  cpu_kernels package) serves `linear`, `contract_rows` and the "xla" attentions where it can: f32
  operands and no mesh (a custom call has no sharding rule). It is chosen when the program is
  lowered (`lax.platform_dependent`), so a program traced here and compiled for a GPU (make
  gpu-check) never holds a CPU custom call. Everywhere else XLA's code runs.
Under a mesh (`jax.set_mesh`), a Pallas kernel runs per device inside `jax.shard_map` over the local
batch and heads (specs from llama_jax.sharding's logical axes); the XLA paths follow the shardings
of their inputs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import cpu_kernels as ck
import pallas_kernels as pk
from llama_jax import context_parallel, quant, sharding
from llama_jax.config import hopper_or_later
from llama_jax.sharding import BLOCK_TABLE, CACHE_AXES, DECODE_Q, HEADS, PAGE_AXES, PER_ROW, ROWS, TOKENS


def resolve(impl: str) -> str:
    """A kernel choice made concrete where the program is traced ("auto": pallas on a GPU, xla
    elsewhere; a resolved RuntimeConfig has chosen already)."""
    if impl == "auto":
        return "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl == "cudnn" and jax.default_backend() != "gpu":
        raise ValueError("attention_impl='cudnn' needs a GPU (use 'xla' or 'pallas')")
    return impl


def check_runtime(runtime) -> None:
    """Refuses, when a model is loaded, kernels this machine cannot run (ValueError, one line)."""
    resolve(runtime.attention_impl)
    if runtime.attention_impl == "mosaic":
        if not hopper_or_later():
            raise ValueError(f"attention_impl='mosaic' needs an NVIDIA GPU of compute capability 9.0 or later "
                             f"(this is {jax.devices()[0].device_kind}); use 'pallas' or 'auto'. On a CPU the "
                             "Mosaic GPU interpreter is for the kernel's tests")
        if runtime.dtype not in ("bfloat16", "float16"):
            raise ValueError(f"attention_impl='mosaic' computes in bfloat16 or float16, not {runtime.dtype}; "
                             "load with dtype='bfloat16' or use 'pallas'")


def describe(runtime) -> str:
    """What computes under a resolved RuntimeConfig, in a few words (llama-jax bench and inspect)."""
    attention = resolve(runtime.attention_impl)
    if runtime.cpu_kernels == "on":
        return "cpu_kernels (C++/MKL: f32 products and attention without a mesh) + xla"
    return "xla" if attention == "xla" else f"xla + {attention} attention"


def _per_device(fn, in_axes: list, out_axes):
    """fn as is without a mesh; under one, mapped over the local shards (kernels see local shapes).
    in_axes: the logical axes of each argument; out_axes: of the output, or a list for several; an
    output axis is split as in the first argument that has it (an axis its mesh axes do not
    divide, such as the T == 1 of a decode step, stays whole)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn

    def mapped(*args):
        in_specs = tuple(sharding.logical_to_mesh(a, jnp.shape(x), mesh) if x is not None else None
                         for a, x in zip(in_axes, args))
        split = {}  # logical axis -> its split in the first argument that has it
        for axes, s in zip(in_axes, in_specs):
            for name, entry in zip(axes, s or ()):
                split.setdefault(name, entry)
        like = lambda axes: P(*(split.get(name) for name in axes))  # noqa: E731
        out_specs = tuple(map(like, out_axes)) if isinstance(out_axes, list) else like(out_axes)
        # check_vma=False: Pallas calls do not declare how their outputs vary over the mesh.
        return jax.shard_map(fn, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)
    return mapped


def _cpu_serves(enabled: bool, *arrays) -> bool:
    """Whether the C++ CPU backend takes these operands: enabled by the RuntimeConfig, all float32,
    and no mesh (see the module docstring)."""
    return enabled and all(a.dtype == jnp.float32 for a in arrays) and jax.sharding.get_abstract_mesh().empty


def _cpu_or(kernel, xla, *args):
    """kernel(*args) where the program runs on the CPU, xla(*args) elsewhere: decided when it is
    lowered, so that a program traced here and compiled for a GPU (make gpu-check) has no CPU
    custom call in it."""
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)


def linear(x, w, *, transposed=False, cpu_kernels=False, mosaic=False):
    """x [..., K] @ w [K, N] -> [..., N] f32 (w stored [N, K] if transposed), accumulated in f32. w
    may be a QArray (llama_jax.quant) in the same layout: its product reads the stored bytes.
    mosaic (attention_impl "mosaic": Hopper): a quantized product of prefill's many rows runs the
    Mosaic GPU kernel where it takes the shape."""
    if isinstance(w, quant.QArray):
        if (w.axis == -1) != transposed:
            raise ValueError(f"linear: a QArray with input axis {w.axis} in a {'transposed' if transposed else 'stored'} layout")
        return _qlinear(x, w, cpu_kernels, mosaic)
    spec = "...K,NK->...N" if transposed else "...K,KN->...N"
    xla = functools.partial(jnp.einsum, spec, preferred_element_type=jnp.float32)
    rows = x.size // x.shape[-1]
    if not rows or not _cpu_serves(cpu_kernels, x, w):
        return xla(x, w)

    def kernel(x, w):
        x2 = x.reshape(-1, x.shape[-1])
        y = ck.gemm(x2, w, False, transposed) if rows >= ck.MIN_ROWS else ck.matvec(x2, w, transposed)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return _cpu_or(kernel, xla, x, w)


def _qlinear(x, w: quant.QArray, cpu_kernels: bool, mosaic: bool):
    """A quantized product (one layer's weight, inference layout, no mesh) where a kernel reads the
    stored bytes: the C++ backend on a CPU (when enabled, f32 activations, a shape it takes), on a
    GPU the Triton kernel, or with `mosaic` for more than its decode rows the Mosaic GPU one (wgmma
    on weight tiles dequantized in registers); decided when lowered, as `_cpu_or`. Elsewhere XLA
    dequantizes into the product (quant.qlinear), which XLA's GPU compiler fuses and XLA CPU does
    not."""
    xla = lambda x, *parts: quant.qlinear(x, w)  # noqa: E731
    if w.axis != -1 or w.ndim != 2 or not jax.sharding.get_abstract_mesh().empty:
        return xla(x)
    parts = (w.values, w.scales) + ((w.mins,) if w.mins is not None else ())
    fmt, group = w.format, w.group_size
    branches = {}  # every branch is traced wherever the program is lowered: only those that take w
    n, k = w.shape
    if mosaic and x.size // k > pk.QUANT_DECODE_ROWS and pk.quant_matmul_mosaic_supports(fmt, group, k, n, x.dtype):
        branches["cuda"] = lambda x, *p: pk.quant_matmul_mosaic(x, *p, fmt=fmt, group_size=group)
    elif pk.quant_matmul_supports(fmt, group, k):
        branches["cuda"] = lambda x, *p: pk.quant_matmul(x, *p, fmt=fmt, group_size=group)
    if _cpu_serves(cpu_kernels, x) and ck.quant.supports(fmt, group, k):
        branches["cpu"] = lambda x, *p: ck.qlinear(x, *p, format=fmt, group_size=group)
    return jax.lax.platform_dependent(x, *parts, default=xla, **branches)


def contract_rows(a, b, *, cpu_kernels=False):
    """a [..., M] and b [..., N] -> [M, N] f32: the sum over rows of a^T b (a weight's gradient)."""
    xla = functools.partial(jnp.einsum, "...M,...N->MN", preferred_element_type=jnp.float32)
    if not _cpu_serves(cpu_kernels, a, b):
        return xla(a, b)
    return _cpu_or(lambda a, b: ck.gemm(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), True, False),
                   xla, a, b)


def embed(table, tokens):
    """Rows of the embedding table [V, D] at tokens [B, T] -> [B, T, D]. When the mesh splits the
    vocabulary, each device looks up the ids that fall in its slice, zeroes the rest, and one
    all-reduce of [B, T, D] sums them (Megatron's vocab-parallel embedding): left to itself, XLA
    all-gathers the whole table for every lookup, 1 GB per generated token for Llama 3.1 8B at tp=8."""
    mesh = jax.sharding.get_abstract_mesh()
    n = 1 if mesh.empty else sharding.axis_size("vocab", mesh)
    rows = quant.take_rows if isinstance(table, quant.QArray) else lambda t, i: t[i]
    if n == 1 or table.shape[0] % n:  # not split (sharding.logical_to_mesh replicates it then)
        return rows(table, tokens)
    axis = sharding.spec(("vocab",))[0]

    def local(table, tokens):
        v = table.shape[0]  # this device's slice of the vocabulary
        i = tokens - jax.lax.axis_index(axis) * v
        here = (i >= 0) & (i < v)
        x = rows(table, jnp.clip(i, 0, v - 1))
        return jax.lax.psum(jnp.where(here[..., None], x, jnp.zeros((), x.dtype)), axis)

    # ("vocab", None): a table split over 'fsdp' as well is gathered whole along D first.
    return _per_device(local, [("vocab", None), TOKENS], ROWS)(table, tokens)


def rms_norm(x, weight, residual=None, *, eps, impl="auto"):
    """RMSNorm of x [B, T, D] (or of h = x + residual, returning (normed, h)), f32 statistics."""
    if resolve(impl) != "pallas":
        return pk.rms_norm_reference(x, weight, residual, eps=eps)
    kernel = functools.partial(pk.rms_norm, eps=eps)
    if residual is None:
        return _per_device(lambda x, w: kernel(x, w), [ROWS, ("norm",)], ROWS)(x, weight)
    return _per_device(kernel, [ROWS, ("norm",), ROWS], [ROWS, ROWS])(x, weight, residual)


def constrain(x, axes):
    """x laid out by its logical axes on the active mesh (an axis the mesh cannot divide stays
    whole); x itself without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, sharding.logical_to_mesh(axes, x.shape, mesh))


def prefill_attention(q, k, v, *, q_offset=None, kv_length=None, segment_ids=None, impl="auto", cpu_kernels=False):
    """Causal attention of q [B, T, H, E] over k, v [B, S, K, E] -> [B, T, H, E]. Query i sits at
    key q_offset + i (a scalar, default 0) and sees the keys up to it, and only the first
    kv_length keys (a scalar, default S: a cache's unwritten tail is never read). segment_ids
    [B, T] (T == S): a query sees only keys of its own segment (packed documents).

    Under a mesh that splits the sequence (context parallelism): without q_offset, q, k, v and
    segment_ids are in context_parallel's balanced order (a no-cache forward); with it, q is a
    prefill chunk in natural order over a cache that holds every key (context_parallel.hidden puts a
    no-cache forward in that order)."""
    impl = resolve(impl)
    b, s = q.shape[0], k.shape[1]
    cp = context_parallel.context_size()
    cp_impl = {"cudnn": "pallas"}.get(impl, impl)
    if cp > 1 and q_offset is None:
        return context_parallel.attention(q, k, v, segment_ids=segment_ids, impl=cp_impl)
    if cp > 1 and q.shape[1] % cp == 0:  # a prefill chunk cp does not divide runs as below, unsplit
        return context_parallel.attention_cached(q, k, v, q_offset=q_offset,
                                                 kv_length=s if kv_length is None else kv_length, impl=cp_impl)
    if impl == "cudnn" and q_offset is None and segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    # Per-row arrays, so that a shard_map splits them with the batch.
    q_off = jnp.broadcast_to(jnp.asarray(0 if q_offset is None else q_offset, jnp.int32), (b,))
    kv_len = jnp.broadcast_to(jnp.asarray(s if kv_length is None else kv_length, jnp.int32), (b,))
    if impl == "xla":
        def run(attention):
            return lambda: attention(q, k, v, causal=True, q_offset=q_off, kv_lengths=kv_len,
                                     q_segment_ids=segment_ids)
        if not _cpu_serves(cpu_kernels, q, k, v):
            return run(pk.blocked_attention)()
        return _cpu_or(run(ck.attention), run(pk.blocked_attention))
    # "pallas" or "mosaic", and "cudnn" for what jax's cuDNN attention does not take (a query
    # offset, segments).
    flash = pk.flash_attention_mosaic if impl == "mosaic" else pk.flash_attention

    def kernel(q, k, v, off, n, seg):
        return flash(q, k, v, causal=True, q_offset=off, kv_lengths=n, q_segment_ids=seg)
    axes = [HEADS, CACHE_AXES, CACHE_AXES, PER_ROW, PER_ROW, TOKENS]
    return _per_device(kernel, axes, HEADS)(q, k, v, q_off, kv_len, segment_ids)


def decode_attention(q, k_cache, v_cache, *, lengths, impl="auto", cpu_kernels=False):
    """One query per sequence q [B, H, E] over the first lengths[b] keys of the cache
    [B, S, K, E] -> [B, H, E]. "pallas" and "mosaic" run the Triton decode kernel: decode is
    memory-bound, and it reads the cache once already (docs/GPU_COMPILE.md)."""
    impl = resolve(impl)
    if impl == "cudnn":
        out = jax.nn.dot_product_attention(q[:, None], k_cache, v_cache, key_value_seq_lengths=lengths,
                                           implementation="cudnn")
        return out[:, 0]
    if impl == "xla":
        xla = functools.partial(pk.blocked_decode_attention, lengths=lengths)
        if not _cpu_serves(cpu_kernels, q, k_cache, v_cache):
            return xla(q, k_cache, v_cache)
        return _cpu_or(functools.partial(ck.decode_attention, lengths=lengths), xla, q, k_cache, v_cache)
    kernel = lambda q, k, v, n: pk.decode_attention(q, k, v, lengths=n)  # noqa: E731
    return _per_device(kernel, [DECODE_Q, CACHE_AXES, CACHE_AXES, PER_ROW], DECODE_Q)(q, k_cache, v_cache, lengths)


# Queries per sequence up to which the Triton paged kernel takes a chunk (speculative decoding's
# verify: K + 1 positions) reading the pages in place, every page once for all of them. Longer
# chunks (prefill) gather their pages into a contiguous cache for the flash kernel's tiles. A
# program's query rows are these positions times the GQA group, in registers: 8 x 8 at most.
MAX_PAGED_QUERIES = 8


def paged_attention(q, k_pages, v_pages, block_tables, *, start, impl="auto", cpu_kernels=False):
    """Causal attention of q [B, T, H, E], row b's queries at positions start[b]..., over a paged
    cache that holds their keys already: token t of row b at pages[block_tables[b, t // page_size],
    t % page_size] (pages [P, page_size, K, E], block_tables [B, max_pages]). -> [B, T, H, E].

    A decode step (T == 1): "xla" gathers a block of pages per loop step (the cache read once,
    never copied whole), or runs the C++ backend's flash-decoding through the table; "pallas",
    "mosaic" and "cudnn" run the Triton paged kernel, which also takes up to MAX_PAGED_QUERIES
    queries per row. Otherwise the pages are gathered into a [B, max_pages * page_size] cache and
    attended as a chunk of a contiguous one (prefill_attention)."""
    b, t = q.shape[:2]
    xla = resolve(impl) == "xla"
    if t == 1 and xla:
        lengths = start + 1
        blocked = functools.partial(pk.blocked_paged_decode_attention, lengths=lengths)
        q = q[:, 0]
        if not _cpu_serves(cpu_kernels, q, k_pages, v_pages):
            return blocked(q, k_pages, v_pages, block_tables)[:, None]
        return _cpu_or(functools.partial(ck.paged_decode_attention, lengths=lengths), blocked, q, k_pages,
                       v_pages, block_tables)[:, None]
    if not xla and t <= MAX_PAGED_QUERIES:
        kernel = lambda q, k, v, table, n: pk.paged_decode_attention(q, k, v, table, n)  # noqa: E731
        axes = [HEADS, PAGE_AXES, PAGE_AXES, BLOCK_TABLE, PER_ROW]
        return _per_device(kernel, axes, HEADS)(q, k_pages, v_pages, block_tables, start + t)
    w, bs = block_tables.shape[1], k_pages.shape[1]
    gather = lambda pool: pool[block_tables].reshape(b, w * bs, *pool.shape[2:])  # noqa: E731
    return prefill_attention(q, gather(k_pages), gather(v_pages), q_offset=start, kv_length=start + t, impl=impl,
                             cpu_kernels=cpu_kernels)
