"""llama-jax: the Llama 3 family in JAX, with hand-written Pallas GPU kernels."""

from llama_jax.api import Llama, from_config, load
from llama_jax.sharding import make_mesh
from llama_jax.config import (
    LLAMA3_1_8B,
    LLAMA3_1_70B,
    LLAMA3_1_405B,
    LLAMA3_2_1B,
    LLAMA3_2_3B,
    LLAMA3_8B,
    LLAMA3_70B,
    PRESETS,
    SMOLLM2_135M,
    LlamaConfig,
    RopeScaling,
    RuntimeConfig,
)

__all__ = [
    "Llama", "LlamaConfig", "RopeScaling", "RuntimeConfig", "load", "from_config", "make_mesh", "PRESETS",
    "LLAMA3_8B", "LLAMA3_70B", "LLAMA3_1_8B", "LLAMA3_1_70B", "LLAMA3_1_405B", "LLAMA3_2_1B",
    "LLAMA3_2_3B", "SMOLLM2_135M",
]
