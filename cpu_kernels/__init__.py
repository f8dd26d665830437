"""The CPU's f32 hot spots as XLA FFI custom calls over Intel MKL: an optional backend of llama-jax.

`pip install llama-jax[cpu]` brings MKL (the `mkl` wheel); the C++ source (csrc/cpu_kernels.cc) is
built with the host's g++ the first time it is needed (`load`). llama_jax uses the kernels when its
`RuntimeConfig.cpu_kernels` says so ("auto": where they serve: a CPU, float32, no mesh; a custom
call has no sharding rule, so under a mesh XLA would gather its operands whole on every device).

- `gemm`, `matvec` (gemm.py): matrix products through MKL's sgemm, and a decode step's few rows on
  threads of our own that spin between products.
- `attention`, `decode_attention` (attention.py): FlashAttention-2 style causal GQA attention,
  forward and backward, and flash-decoding over a KV cache.
- `qlinear` (quant.py): products with int8, int4 and fp8 weights (llama_jax.quant's QArray arrays,
  GGUF's Q8_0 / Q4_0 / Q4_1 blocks as stored), reading the quantized bytes themselves.
Each has a reference with the same contract (`gemm_reference`; pallas_kernels' attention
references; llama_jax.quant.dequantize then a product), which tests/test_cpu_kernels.py and
tests/test_cpu_quant.py compare against. This package imports nothing of llama_jax.
"""

from cpu_kernels._library import installed, keep_freed_memory, load, require
from cpu_kernels.attention import attention, decode_attention, paged_decode_attention
from cpu_kernels.gemm import MIN_ROWS, gemm, gemm_reference, matvec
from cpu_kernels.quant import qlinear

__all__ = ["MIN_ROWS", "attention", "decode_attention", "gemm", "paged_decode_attention", "gemm_reference", "installed", "keep_freed_memory",
           "load", "matvec", "qlinear", "require"]
