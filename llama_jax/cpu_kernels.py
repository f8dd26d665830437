"""The model's f32 hot spots on the CPU as XLA FFI custom calls over Intel MKL (csrc/cpu_kernels.cc).

- `gemm`: matrix products through MKL's sgemm. XLA:CPU's GEMM runs at 0.7-0.9x of MKL's on this
  project's layer shapes, and jaxlib 0.10 has no working oneDNN path (`--xla_cpu_use_onednn` and
  its kin change nothing); transformers + torch call MKL.
- `matvec`: the products of a decode step's few rows, on threads of our own that spin between
  products: a step is ~200 products of a few MB, one after another, too short for a pool whose
  threads sleep (XLA's own product ran one thread, 19 GB/s here; ours reads 23-25 GB/s).
- `decode_attention`: one query per head over a KV cache, each sequence's keys split into chunks
  over those threads (flash-decoding); XLA's blocked loop ran at half its speed.
- `attention`: causal GQA attention, forward and backward, FlashAttention-2 style, per (sequence,
  kv head, block) on XLA's thread pool, MKL GEMMs on an L2-resident tile and one pass of mask, max
  and exp between them (what torch's CPU flash kernel does). XLA's blocked attention
  (pallas_kernels.blocked_attention) spends 1.5-2x torch's time per score: each softmax step is its
  own XLA op over the tile.

They are used (`enabled_for`) when all of these hold, else the callers' XLA code runs as before:
- JAX's default backend is the CPU, and both operands are float32;
- no mesh is active (a custom call has no sharding rule: under a mesh XLA would gather its
  operands whole on every device);
- the shared library builds and loads: it is compiled once with the host's g++ against jaxlib's
  FFI headers and the `mkl` wheel's libmkl_rt, into $LLAMA_JAX_CACHE/cpu-kernels/<hash>/ (written
  to a temporary name, then renamed), and reused after;
- $LLAMA_JAX_CPU_KERNELS is not "0" (set it to compare against XLA's own code).
A failed build or load is a one-line warning, once, and XLA's code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import tempfile
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.default_model import cache_dir
from pallas_kernels._common import MASK_VALUE, normalize_masks, sm_scale_or_default

ENV = "LLAMA_JAX_CPU_KERNELS"
# Products of fewer rows (decode steps) go to `matvec`, which reads each weight once for all rows.
MIN_ROWS = 16
_GEMM, _MATVEC = "llama_jax_gemm", "llama_jax_matvec"
_ATTENTION, _ATTENTION_BWD = "llama_jax_attention", "llama_jax_attention_bwd"
_DECODE_ATTENTION = "llama_jax_decode_attention"
_SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_kernels.cc")


def _mkl_lib_dir() -> str:
    """The directory holding the `mkl` wheel's libmkl_rt.so.N."""
    try:
        dist = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the mkl package is not installed (pip install mkl)") from None
    for f in dist.files or ():
        if f.name.startswith("libmkl_rt.so."):
            return os.path.dirname(os.path.abspath(dist.locate_file(f)))
    raise RuntimeError("the mkl package has no libmkl_rt.so")


def _build() -> str:
    """The compiled library's path, building it first if this source, jaxlib and MKL have none."""
    with open("/proc/cpuinfo") as f:  # the kernel's loops are AVX2 + FMA (x86-64-v3)
        flags = f.read().split()
    if "avx2" not in flags or "fma" not in flags:
        raise RuntimeError("this CPU has no AVX2 and FMA")
    mkl = _mkl_lib_dir()
    rt = sorted(n for n in os.listdir(mkl) if n.startswith("libmkl_rt.so."))[0]
    key = hashlib.sha256(jax.__version__.encode() + mkl.encode())
    for path in (_SOURCE, __file__):  # the source and its build command
        with open(path, "rb") as f:
            key.update(f.read())
    key = key.hexdigest()[:16]
    out_dir = os.path.join(cache_dir(), "cpu-kernels", key)
    lib = os.path.join(out_dir, "libllama_jax_cpu_kernels.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = ["g++", "-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}", _SOURCE,
           "-o", tmp, f"-L{mkl}", f"-l:{rt}", f"-Wl,-rpath,{mkl}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ failed on {_SOURCE}: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def _loaded() -> bool:
    if os.environ.get(ENV, "1") == "0" or jax.default_backend() != "cpu":
        return False
    try:
        lib = ctypes.CDLL(_build())
        lib.llama_jax_gemm_init()
        jax.ffi.register_ffi_target(_GEMM, jax.ffi.pycapsule(lib.LlamaJaxGemm), platform="cpu")
        jax.ffi.register_ffi_target(_MATVEC, jax.ffi.pycapsule(lib.LlamaJaxMatvec), platform="cpu")
        jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(lib.LlamaJaxAttention), platform="cpu")
        jax.ffi.register_ffi_target(_ATTENTION_BWD, jax.ffi.pycapsule(lib.LlamaJaxAttentionBwd), platform="cpu")
        jax.ffi.register_ffi_target(_DECODE_ATTENTION, jax.ffi.pycapsule(lib.LlamaJaxDecodeAttention), platform="cpu")
    except (OSError, RuntimeError) as e:
        warnings.warn(f"llama_jax.cpu_kernels: using XLA's code ({e})", stacklevel=3)
        return False
    return True


def enabled_for(*arrays) -> bool:
    """Whether these operands go to the CPU kernels (see the module docstring)."""
    return (all(a.dtype == jnp.float32 for a in arrays) and jax.sharding.get_abstract_mesh().empty
            and _loaded())


@functools.cache
def keep_freed_memory() -> bool:
    """Tells glibc's malloc to keep freed memory for reuse instead of returning it to the OS, for a
    process that runs the same large programs over and over (a training loop): glibc serves every
    allocation above 32 MB with its own mmap and unmaps it when freed, so each step's large
    temporaries (logits, the embedding's gradient) came back as fresh pages to fault in and zero:
    18% of a SmolLM2 training step on this CPU in perf; with this the step ran 12% faster. The
    process's resident memory then stays at its peak. True where it took (Linux, glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    # No mmap for large blocks, and no trimming of the heap's top (-1: never; a step's temporaries
    # run to gigabytes, so a 1 GB threshold still gave them back: 3% of a step).
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def _require():
    if not _loaded():
        raise RuntimeError(f"llama_jax.cpu_kernels: the kernels did not load (see the warning; ${ENV})")


def _call(a, b, trans_a: bool, trans_b: bool):
    _require()
    m = a.shape[-1] if trans_a else a.shape[-2]
    n = b.shape[-2] if trans_b else b.shape[-1]
    batch = a.shape[:-2] if a.ndim > 2 else b.shape[:-2]
    out = jax.ShapeDtypeStruct((*batch, m, n), jnp.float32)
    return jax.ffi.ffi_call(_GEMM, out, vmap_method="sequential")(a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def gemm(a, b, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) in f32 through MKL, op transposing the last two dims when asked. a
    [batch..., p, q], b [batch..., r, s], or either without batch dims (shared by the batch).
    Differentiable (both gradients are GEMMs too). Call it when `enabled_for(a, b)`."""
    return _call(a, b, trans_a, trans_b)


def _gemm_fwd(a, b, trans_a, trans_b):
    return _call(a, b, trans_a, trans_b), (a, b)


def _gemm_bwd(trans_a, trans_b, res, g):
    a, b = res
    if a.ndim == 2 and b.ndim > 2:  # a shared by the batch: c^T = op(b)^T op(a)^T, b's case below
        return _gemm_bwd(not trans_b, not trans_a, (b, a), jnp.swapaxes(g, -1, -2))[::-1]
    # c = op(a) op(b): d op(a) = g op(b)^T, d op(b) = op(a)^T g, each transposed back if op was.
    da = _call(b, g, trans_b, True) if trans_a else _call(g, b, False, not trans_b)
    if b.ndim == 2 and a.ndim > 2:  # b shared by the batch: its gradient sums over it
        a2, g2 = a.reshape(-1, *a.shape[-2:]), g.reshape(-1, *g.shape[-2:])
        if not trans_a:  # rows stack: one GEMM over all of them
            a2, g2 = a2.reshape(-1, a.shape[-1]), g2.reshape(-1, g.shape[-1])
            db = _call(g2, a2, True, False) if trans_b else _call(a2, g2, True, False)
        else:
            db = sum(_call(g2[i], a2[i], True, True) if trans_b else _call(a2[i], g2[i], False, False)
                     for i in range(a2.shape[0]))
    else:
        db = _call(g, a, True, trans_a) if trans_b else _call(a, g, not trans_a, False)
    return da, db


gemm.defvjp(_gemm_fwd, _gemm_bwd)


def _matvec_call(x, w, transposed):
    _require()
    n = w.shape[0] if transposed else w.shape[1]
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call(_MATVEC, out, vmap_method="sequential")(x, w, trans=transposed)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matvec(x, w, transposed: bool = False):
    """x [M, K] @ w [K, N] (w [N, K] if transposed) for a few rows M (decode steps), f32: the
    products split over threads that spin between them. Differentiable (the gradients are
    `gemm`'s). Call it when `enabled_for(x, w)`."""
    return _matvec_call(x, w, transposed)


matvec.defvjp(lambda x, w, transposed: (_matvec_call(x, w, transposed), (x, w)),
              lambda transposed, res, g: _gemm_bwd(False, transposed, res, g))


# Query positions per work item (times G rows) and keys per tile: the (128 * G, 128) f32 score
# tile stays in L2.
BLOCK_Q, BLOCK_K = 128, 128


def _attention_call(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks):
    _require()
    B, T, H, _ = q.shape
    K = k.shape[2]
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((B, K, T * (H // K)), jnp.float32))
    return jax.ffi.ffi_call(_ATTENTION, out, vmap_method="sequential")(
        q, k, v, q_off, kv_len, q_seg, kv_seg, causal=causal, sm_scale=np.float32(sm_scale),
        lse_empty=np.float32(-MASK_VALUE), block_q=np.int64(blocks[0]), block_k=np.int64(blocks[1]))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _attention(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks):
    return _attention_call(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks)[0]


def _attention_fwd(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks):
    o, lse = _attention_call(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale, blocks)
    return o, (q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse)


def _attention_bwd(causal, sm_scale, blocks, res, do):
    q, k, v, q_off, kv_len, q_seg, kv_seg, o, lse = res
    B, T, H, E = q.shape
    K = k.shape[2]
    # rowsum(o * do) per (kv head, t, g) row, in lse's layout.
    delta = jnp.sum(o * do, axis=-1).reshape(B, T, K, H // K).transpose(0, 2, 1, 3).reshape(B, K, -1)
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct(k.shape, jnp.float32),
           jax.ShapeDtypeStruct(v.shape, jnp.float32))
    dq, dk, dv = jax.ffi.ffi_call(_ATTENTION_BWD, out, vmap_method="sequential")(
        q, k, v, do.astype(jnp.float32), lse, delta, q_off, kv_len, q_seg, kv_seg, causal=causal,
        sm_scale=np.float32(sm_scale), block_q=np.int64(blocks[0]), block_k=np.int64(blocks[1]))
    return dq, dk, dv, None, None, None, None  # the int inputs have no cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)


def attention(q, k, v, *, causal=True, q_offset=None, kv_lengths=None, q_segment_ids=None,
              kv_segment_ids=None, sm_scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """`pallas_kernels.blocked_attention`'s function and contract (q [B, T, H, E], k, v [B, S, K, E],
    f32; a query that sees no key gets 0), forward and backward by the CPU kernel. Call it when
    `enabled_for(q, k, v)`."""
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    if H % K:
        raise ValueError(f"{H=} query heads is not a multiple of {K=} kv heads")
    q_off, kv_len, q_seg, kv_seg = normalize_masks(B, T, S, q_offset, kv_lengths, q_segment_ids, kv_segment_ids)
    if T == 0 or S == 0:
        return jnp.zeros_like(q)
    if q_seg is None:  # no documents: empty segment ids, which the kernel reads as none
        q_seg = kv_seg = jnp.zeros((B, 0), jnp.int32)
    return _attention(q, k, v, q_off, kv_len, q_seg, kv_seg, causal, sm_scale_or_default(sm_scale, E),
                      (block_q, block_k))


def decode_attention(q, k_cache, v_cache, *, lengths, sm_scale=None):
    """`pallas_kernels.blocked_decode_attention`'s function and contract (q [B, H, E] over the first
    lengths[b] keys of k_cache, v_cache [B, S, K, E], f32; no keys give 0), forward only: each
    sequence's keys split into chunks over the spinning threads. Call it when
    `enabled_for(q, k_cache, v_cache)`."""
    _require()
    B, H, E = q.shape
    if H % k_cache.shape[2]:
        raise ValueError(f"H={H} query heads is not a multiple of K={k_cache.shape[2]} kv heads")
    lengths = jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (B,))
    return jax.ffi.ffi_call(_DECODE_ATTENTION, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")(
        q, k_cache, v_cache, lengths, sm_scale=np.float32(sm_scale_or_default(sm_scale, E)))
