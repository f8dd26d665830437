"""Random multi-shard Hugging Face checkpoints, and a converter run in a subprocess that reports its
peak memory: for the converter's memory test and benchmarks/convert.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from llama_jax.checkpoint import GLOBAL_TABLE, LAYER_TABLE, param_shapes
from llama_jax.config import LlamaConfig


def hf_config_dict(c: LlamaConfig) -> dict:
    """A transformers config.json for `c`."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads, "intermediate_size": c.ffn_dim, "head_dim": c.head_dim,
            "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta, "max_position_embeddings": c.max_seq_len,
            "tie_word_embeddings": c.tie_embeddings, "bos_token_id": c.bos_id, "eos_token_id": list(c.eos_ids),
            "hidden_act": "silu", "torch_dtype": "float32"}


def write_random_hf(dst: str | os.PathLike, config: LlamaConfig, *, seed: int = 0) -> int:
    """Writes a random float32 checkpoint of `config` at `dst`: one safetensors shard per layer plus
    one for the embeddings, norm and head, with model.safetensors.index.json. Holds one shard in
    memory at a time. Returns the total bytes of tensor data."""
    from safetensors.numpy import save_file

    os.makedirs(dst, exist_ok=True)
    shapes = param_shapes(config)
    rng = np.random.default_rng(seed)
    weight_map, total = {}, 0

    def hf_shape(path, shape, fn):  # HF stores linear weights [out, in]
        return tuple(reversed(shape)) if fn is not None else shape

    shards = [{name: hf_shape(p, shapes[p], fn) for p, (name, fn) in GLOBAL_TABLE.items() if p in shapes}]
    for i in range(config.n_layers):
        shards.append({name.format(i=i): hf_shape(p, shapes[("layers", *p)][1:], fn)
                       for p, (name, fn) in LAYER_TABLE.items()})
    for k, tensors in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {n: (rng.standard_normal(s, np.float32) * 0.02) for n, s in tensors.items()}
        save_file(arrays, os.path.join(dst, fname))
        total += sum(a.nbytes for a in arrays.values())
        weight_map.update({n: fname for n in arrays})
        del arrays
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f)
    return total


_MEASURE = """
import json, sys, time
t = time.time()
from checkpoints_tools.convert import convert
convert(sys.argv[1], sys.argv[2], dtype=sys.argv[3], progress=False)
seconds = time.time() - t
hwm = [int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0]
print(json.dumps({"peak_rss": hwm, "seconds": seconds}))
"""


def convert_in_subprocess(src, dst, *, dtype: str = "bfloat16") -> dict:
    """Converts in a fresh interpreter; returns {"peak_rss": bytes (VmHWM), "seconds": float}."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's converter runs
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(src), str(dst), dtype], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"conversion failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
