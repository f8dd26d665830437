"""convert-weights: a Hugging Face directory or a .gguf file -> a converted checkpoint (Orbax params,
llama_config.json, tokenizer files; docs/CHECKPOINT_FORMAT.md).

    python -m checkpoints_tools.convert SRC DST [--dtype bfloat16|float32] [--quantize int8|int4|fp8]
        [--force] [--allow-extra]

Quantized weights (llama_jax.quant, docs/CHECKPOINT_FORMAT.md): a GGUF's Q8_0, Q4_0 and Q4_1 tensors
are stored as they are (int8 / int4 with their scales and minimums); other GGUF types dequantize, with
a line saying so. --quantize rounds every other linear weight to the format as it streams, and the
embedding and output head to 8 bits (llama_jax.quant.quantization_plan).

Memory: tensors stream from the source's memory map into Orbax one at a time (llama_jax.orbax_io),
and each source tensor's mapped pages are dropped once written, so the converting process holds about
one tensor plus TensorStore's buffers, whatever the model's size.

Atomic: everything is written into `.DST.convert-PID.tmp` beside DST and renamed at the end. A failure
removes it; a run killed outright (SIGKILL) leaves it, and the next conversion to the same DST removes
temporaries whose PID is no longer running. An existing DST is refused unless force=True, and then
replaced only once the new one is complete.

Exit codes of `main`: 0 done; 2 usage (bad arguments, SRC missing, DST exists without --force);
1 conversion failure (a bad checkpoint, a write error). Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
from typing import Callable, Iterator

DTYPES = ("bfloat16", "float32")


class ConvertError(ValueError):
    """A conversion failure caused by the input (exit code 1)."""


class UsageError(ValueError):
    """Bad arguments, missing SRC, or DST in the way (exit code 2)."""


@dataclasses.dataclass
class _Source:
    config: object  # LlamaConfig
    tensors: Callable[[], Iterator]
    write_tokenizer: Callable[[str], None]
    kind: str
    kept: dict = dataclasses.field(default_factory=dict)  # path -> QSpec of the weights it yields quantized


def _temp_names(dst: str) -> re.Pattern:
    return re.compile(rf"^\.{re.escape(os.path.basename(dst))}\.(convert|replaced)-(\d+)\.tmp$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(dst: str) -> list[str]:
    """Removes temporaries of earlier conversions to `dst` whose process is gone (killed mid-way).
    Returns the removed paths."""
    parent, pattern, removed = os.path.dirname(dst), _temp_names(dst), []
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        m = pattern.match(name)
        if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


def _is_gguf(src: str) -> bool:
    if not os.path.isfile(src):
        return False
    with open(src, "rb") as f:
        return f.read(4) == b"GGUF"


def _hf_source(src: str, allow_extra: bool) -> _Source:
    from llama_jax.checkpoint import CheckpointError, HFCheckpoint, iter_hf_tensors
    from llama_jax.config import LlamaConfig
    from llama_jax.export import copy_tokenizer_files
    from llama_jax.gguf_io import drop_mapped_pages

    if not os.path.isfile(os.path.join(src, "config.json")):
        raise CheckpointError(f"{src}: no config.json (not a Hugging Face model directory)")
    config = LlamaConfig.from_hf(src)
    gen_path = os.path.join(src, "generation_config.json")
    if os.path.isfile(gen_path):  # generation's eos ids (int or list) join config.json's
        try:
            with open(gen_path) as f:
                gen = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{gen_path}: not valid JSON ({e})") from None
        eos = gen.get("eos_token_id")
        eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
        bos = config.bos_id if config.bos_id is not None else gen.get("bos_token_id")
        config = dataclasses.replace(config, eos_ids=tuple(dict.fromkeys([*config.eos_ids, *map(int, eos)])),
                                     bos_id=None if bos is None else int(bos))
    ckpt = HFCheckpoint(src)  # checks the index, shards, truncation, pickles

    def tensors():
        for path, layer, a in iter_hf_tensors(ckpt, config, allow_extra=allow_extra):
            yield path, layer, a
            drop_mapped_pages(a)  # written by now: let its pages leave our resident set

    def write_tokenizer(dst):
        found = copy_tokenizer_files(src, dst)
        if "tokenizer.model" not in found and "tokenizer.json" not in found:
            print(f"warning: {src}: no tokenizer.json or tokenizer.model; the converted checkpoint has no "
                  "tokenizer", file=sys.stderr)

    return _Source(config, tensors, write_tokenizer, "Hugging Face safetensors")


def _gguf_source(src: str, allow_extra: bool) -> _Source:
    from llama_jax.gguf_io import GGUFCheckpoint

    g = GGUFCheckpoint(src)
    files = g.tokenizer_files()  # before any weight: an unsupported tokenizer fails fast

    def write_tokenizer(dst):
        for name, text in files.items():
            with open(os.path.join(dst, name), "w") as f:
                f.write(text)

    dequantized = g.dequantized_types()
    if dequantized:
        print(f"note: {src}: " + ", ".join(f"{n} {t} tensors" for t, n in sorted(dequantized.items()))
              + " dequantized to float (kept as they are: Q8_0, Q4_0, Q4_1)", file=sys.stderr)
    return _Source(g.config, lambda: g.tensors(allow_extra=allow_extra, keep_quantized=True), write_tokenizer,
                   "GGUF", g.kept())


def _open_source(src: str, allow_extra: bool) -> _Source:
    if not os.path.exists(src):
        raise UsageError(f"{src}: no such file or directory")
    if os.path.isdir(src):
        return _hf_source(src, allow_extra)
    if _is_gguf(src):
        return _gguf_source(src, allow_extra)
    if src.endswith((".bin", ".pth", ".pt")):
        raise ConvertError(f"{src}: a pickle checkpoint; we never unpickle weights: convert it to safetensors first")
    raise UsageError(f"{src}: neither a Hugging Face model directory nor a .gguf file")


def _dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert(src, dst, *, dtype: str = "bfloat16", quantize: str | None = None, force: bool = False,
            allow_extra: bool = False, progress: bool = True) -> str:
    """Converts SRC (a Hugging Face model directory or a .gguf file) into the converted checkpoint
    directory DST, float parameters stored in `dtype`, the GGUF's Q8_0/Q4_0/Q4_1 weights as they are,
    and with `quantize` every other linear weight quantized. Returns DST. Raises UsageError (bad
    arguments, DST exists without force) or a ValueError naming the culprit; nothing is left at DST
    on failure."""
    import jax
    import numpy as np
    from tqdm import tqdm

    from llama_jax import orbax_io, quant
    from llama_jax.checkpoint import param_shapes
    from llama_jax.model import LINEAR_WEIGHTS

    src, dst = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r}: must be one of {', '.join(DTYPES)}")
    if quantize not in (None, *quant.FORMATS):
        raise UsageError(f"quantize {quantize!r}: must be one of {', '.join(quant.FORMATS)}")
    if os.path.lexists(dst) and not force:
        raise UsageError(f"{dst}: already exists (use --force to replace it)")
    if dst == src or src.startswith(dst + os.sep):
        raise UsageError(f"{dst}: would replace the source {src}")
    parent = os.path.dirname(dst)
    if not os.path.isdir(parent):
        raise UsageError(f"{parent}: no such directory (the parent of DST)")
    start = time.time()
    source = _open_source(src, allow_extra)
    config = source.config
    shapes = param_shapes(config)
    plan = quant.quantization_plan(shapes, quantize, LINEAR_WEIGHTS) if quantize else {}
    quantized = {**{p: quant.QSpec.quantized(fmt, axis) for p, (fmt, axis) in plan.items()}, **source.kept}
    n_tensors = sum(s[0] if p[0] == "layers" else 1 for p, s in shapes.items())
    total = sum(math.prod(s) * d.itemsize for s, d in orbax_io.stored_leaves(config, dtype, quantized).values())

    def tensors():
        for path, layer, a in source.tensors():
            if path in plan and not isinstance(a, quant.QArray):
                name = ".".join(path) + ("" if layer is None else f"[{layer}]")
                a = jax.tree.map(np.asarray, quant.quantize_weight(name, a, *plan[path]))
            yield path, layer, a

    clean_stale_temps(dst)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.convert-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    # disable=None: the bar shows on a terminal only, so logs and pipes get just the summary.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=None if progress else True,
               file=sys.stderr)
    count = [0]

    def on_tensor(a):
        count[0] += 1
        bar.update(a.nbytes)
        bar.set_postfix_str(f"{count[0]}/{n_tensors} tensors", refresh=False)

    try:
        orbax_io.write_params(os.path.join(tmp, orbax_io.PARAMS_DIR), config, dtype, tensors(),
                              on_tensor=on_tensor, quantized=quantized)
        bar.close()
        orbax_io.write_config(tmp, config, dtype, quantized)
        source.write_tokenizer(tmp)
        _fsync_dir(tmp)
        if os.path.lexists(dst):  # force: the old one goes only now that the new one is complete
            old = os.path.join(parent, f".{os.path.basename(dst)}.replaced-{os.getpid()}.tmp")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old) if os.path.isdir(old) else os.unlink(old)
        else:
            os.rename(tmp, dst)
        _fsync_dir(parent)
    except BaseException:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        elapsed, size = time.time() - start, _dir_size(dst)
        formats = sorted({q.format for q in quantized.values()})
        stored = dtype + (f", {'/'.join(formats)} weights" if formats else "")
        print(f"converted {source.kind} {src} -> {dst}: {count[0]} tensors, {size / 1e6:.1f} MB ({stored}) "
              f"in {elapsed:.1f} s ({total / 1e6 / max(elapsed, 1e-9):.0f} MB/s)")
    return dst


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The convert arguments, shared with `llama-jax convert`."""
    p.add_argument("src", metavar="SRC", help="a Hugging Face model directory or a .gguf file")
    p.add_argument("dst", metavar="DST", help="the converted checkpoint directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored float parameter dtype (default bfloat16)")
    p.add_argument("--quantize", choices=("int8", "int4", "fp8"), default=None,
                   help="store the linear weights quantized (weight-only, round to nearest; the embedding "
                        "and head at 8 bits)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-extra", action="store_true", help="ignore tensors we do not use instead of failing")


def run(args: argparse.Namespace) -> int:
    """Runs a parsed convert command; returns the exit code, printing errors as one line."""
    from llama_jax.checkpoint import CheckpointError
    from llama_jax.safetensors_io import SafetensorsError

    try:
        convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize, force=args.force,
                allow_extra=args.allow_extra)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, SafetensorsError, ConvertError, ValueError, OSError) as e:
        # Every checkpoint error names its file; an OSError names the path it failed on.
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m checkpoints_tools.convert", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
