"""Inference on a ('data', 'model') mesh: the batch split over `dp` devices, each layer over `tp`.

    python examples/sharded_inference.py [MODEL_DIR] [--dp 2] [--tp 3]

On a CPU this fakes 8 devices (XLA_FLAGS, set before JAX starts). tp must fit the model's heads:
SmolLM2-135M (the default model) has 9 query and 3 KV heads, so tp is 1, 3 or 9; Llama 3 8B has 32
and 8, so tp is 1, 2, 4, 8, 16 or 32. The batch must be a multiple of dp.
"""

import os

# Before JAX starts: the number of (fake) CPU devices is fixed when its backend initializes.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import argparse  # noqa: E402

import jax  # noqa: E402

import llama_jax  # noqa: E402
from llama_jax.default_model import default_model_path  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("model", nargs="?")
p.add_argument("--dp", type=int, default=2)
p.add_argument("--tp", type=int, default=3)
args = p.parse_args()

mesh = llama_jax.make_mesh(args.dp, args.tp)
print(f"{jax.device_count()} devices; mesh {({k: n for k, n in mesh.shape.items() if n > 1})}")
# Each parameter goes straight onto its sharding (from a converted checkpoint, each device reads
# only its shard).
model = llama_jax.load(args.model or default_model_path(), mesh=mesh)

prompts = ["The capital of France is", "The capital of Italy is"]  # a multiple of dp
for prompt, c in zip(prompts, model.generate(prompts, max_new_tokens=8)):
    print(f"{prompt}{c.text!r}")
