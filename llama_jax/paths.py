"""Where llama-jax keeps what it makes once and reuses: the bottom of the stack (imports nothing of ours).

`$LLAMA_JAX_CACHE`, default `~/.cache/llama-jax/`: the converted default model, JAX's compiled
programs (`jax-compile/`), tokenized training corpora (`tokens/`). The optional CPU backend builds
its library under the same root (`cpu-kernels/`, read by the cpu_kernels package itself).
"""

from __future__ import annotations

import os

CACHE_ENV = "LLAMA_JAX_CACHE"


def cache_dir() -> str:
    """Where converted models and other caches live: $LLAMA_JAX_CACHE, else ~/.cache/llama-jax."""
    return os.path.abspath(os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "llama-jax"))
