"""Building and loading the C++ library (csrc/*.cc) as XLA FFI targets, once per process.

It is compiled with the host's g++ against jaxlib's FFI headers and the `mkl` wheel's libmkl_rt
(the `cpu` extra: `pip install llama-jax[cpu]`), into `$LLAMA_JAX_CACHE/cpu-kernels/<hash>/` (default
`~/.cache/llama-jax`; written to a temporary name, then renamed), and reused after. The hash covers
the source, this file (the build command), jax's version and MKL's location.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import subprocess
import tempfile

import jax

GEMM, MATVEC = "llama_jax_gemm", "llama_jax_matvec"
ATTENTION, ATTENTION_BWD = "llama_jax_attention", "llama_jax_attention_bwd"
DECODE_ATTENTION = "llama_jax_decode_attention"
QLINEAR = "llama_jax_qlinear"
_CSRC = os.path.join(os.path.dirname(__file__), "csrc")
_SOURCES = [os.path.join(_CSRC, name) for name in ("cpu_kernels.cc", "quant.cc")]
_HEADERS = [os.path.join(_CSRC, "common.h")]
# The same cache as llama_jax's (llama_jax.paths); read here because this package imports nothing
# of llama_jax.
_CACHE_ENV = "LLAMA_JAX_CACHE"


def _build_root() -> str:
    root = os.environ.get(_CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llama-jax")
    return os.path.join(os.path.abspath(root), "cpu-kernels")


def installed() -> bool:
    """Whether MKL (the `cpu` extra) is installed: without it `load` can only fail."""
    try:
        _mkl_lib_dir()
    except RuntimeError:
        return False
    return True


def _mkl_lib_dir() -> str:
    """The directory holding the `mkl` wheel's libmkl_rt.so.N."""
    try:
        dist = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("the mkl package is not installed (pip install 'llama-jax[cpu]')") from None
    for f in dist.files or ():
        if f.name.startswith("libmkl_rt.so."):
            return os.path.dirname(os.path.abspath(dist.locate_file(f)))
    raise RuntimeError("the mkl package has no libmkl_rt.so")


def _build() -> str:
    """The compiled library's path, building it first if this source, jaxlib and MKL have none."""
    with open("/proc/cpuinfo") as f:  # the kernels' loops are AVX2 + FMA + F16C (x86-64-v3)
        flags = f.read().split()
    if not {"avx2", "fma", "f16c"} <= set(flags):
        raise RuntimeError("this CPU has no AVX2, FMA and F16C")
    mkl = _mkl_lib_dir()
    rt = sorted(n for n in os.listdir(mkl) if n.startswith("libmkl_rt.so."))[0]
    key = hashlib.sha256(jax.__version__.encode() + mkl.encode())
    for path in (*_SOURCES, *_HEADERS, __file__):  # the sources and their build command
        with open(path, "rb") as f:
            key.update(f.read())
    key = key.hexdigest()[:16]
    out_dir = os.path.join(_build_root(), key)
    lib = os.path.join(out_dir, "libllama_jax_cpu_kernels.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = ["g++", "-O3", "-mavx2", "-mfma", "-mf16c", "-std=c++17", "-shared", "-fPIC", "-w",
           f"-I{jax.ffi.include_dir()}", *_SOURCES, "-o", tmp, f"-L{mkl}", f"-l:{rt}", f"-Wl,-rpath,{mkl}"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"g++ failed on {_CSRC}: {done.stderr.strip().splitlines()[-1:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.cache
def load() -> str | None:
    """Builds (first time only) and loads the library and registers its FFI targets. Returns None
    when it is ready, else why not (one line): not a CPU backend, no AVX2/FMA, no MKL, no g++, a
    failed build or load. Callers decide what a failure means (llama_jax.config.RuntimeConfig)."""
    if jax.default_backend() != "cpu":
        return f"JAX's default backend is {jax.default_backend()}, not the CPU"
    try:
        lib = ctypes.CDLL(_build())
        lib.llama_jax_gemm_init()
        for name, symbol in ((GEMM, lib.LlamaJaxGemm), (MATVEC, lib.LlamaJaxMatvec), (ATTENTION, lib.LlamaJaxAttention),
                             (ATTENTION_BWD, lib.LlamaJaxAttentionBwd),
                             (DECODE_ATTENTION, lib.LlamaJaxDecodeAttention), (QLINEAR, lib.LlamaJaxQLinear)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError) as e:
        return str(e)
    return None


def require() -> None:
    """Raises RuntimeError (with the reason) unless the library is loaded."""
    why = load()
    if why is not None:
        raise RuntimeError(f"cpu_kernels: the library is not loaded ({why})")


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
