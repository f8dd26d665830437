"""Text generation with the Python API: greedy and streamed, then a sampled batch.

    python examples/generate.py [MODEL_DIR]

MODEL_DIR: a directory made by `llama-jax convert`, or a Hugging Face one (config.json and
safetensors). Without it, the default model: SmolLM2-135M-Instruct, converted on first use.
"""

import sys

import llama_jax
from llama_jax.default_model import default_model_path

path = sys.argv[1] if len(sys.argv) > 1 else default_model_path()
model = llama_jax.load(path)  # float32 on CPU, bfloat16 on GPU

# Streaming: text pieces as the device produces them (one piece per decode chunk of 32 tokens).
# temperature 0 (the default) is greedy.
prompt = "The capital of France is"
print(prompt, end="")
for piece in model.stream(prompt, max_new_tokens=12):
    print(piece, end="", flush=True)
print()

# A batch of prompts in one call, sampled: the same seed gives the same texts.
prompts = ["Once upon a time", "The three primary colors are"]
for c in model.generate(prompts, max_new_tokens=12, temperature=0.8, top_p=0.95, seed=1):
    print(f"{c.text!r} ({len(c.token_ids)} tokens, finish_reason={c.finish_reason})")
