"""Writing a model directory from a parameter tree: Hugging Face safetensors (`write_hf`), our
converted format (`write_ours`), and the tokenizer files copied along. The trainer's export uses them."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from llama_jax.config import LlamaConfig

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files a model directory has into dst; returns their names."""
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    for name in found:
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    return found


def write_hf(directory: str, params: dict, config: LlamaConfig) -> None:
    """config.json and model.safetensors (float32) that transformers' LlamaForCausalLM loads."""
    from safetensors.numpy import save_file

    from llama_jax.checkpoint import hf_config_dict, to_hf_state_dict

    tensors = {k: v.astype(np.float32) for k, v in to_hf_state_dict(params, config).items()}
    path = os.path.join(directory, "model.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # safetensors writes 0600; make it readable like the other files
    write_json_atomic(os.path.join(directory, "config.json"), hf_config_dict(config, dtype="float32"))


def write_ours(directory: str, params: dict, config: LlamaConfig, dtype: str) -> None:
    """Our converted format (llama_jax.orbax_io): Orbax params beside llama_config.json."""
    from llama_jax import orbax_io
    from llama_jax.checkpoint import param_shapes

    def tensors():
        for path in param_shapes(config):
            node = params
            for key in path:
                node = node[key]
            if path[0] == "layers":
                for i in range(node.shape[0]):
                    yield path, i, node[i]
            else:
                yield path, None, node

    orbax_io.write_params(os.path.join(directory, orbax_io.PARAMS_DIR), config, dtype, tensors())
    orbax_io.write_config(directory, config, dtype)


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)

