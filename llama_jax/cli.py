"""The `llama-jax` command: one subcommand per function (`convert`, `inspect`; later `generate`,
`chat`, `bench`).

Exit codes: 0 done; 2 usage errors (bad arguments, a missing model path, DST in the way);
1 failures caused by the input (a bad checkpoint) or the disk. Errors print one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys


def _error(msg: str, code: int) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def cmd_convert(args: argparse.Namespace) -> int:
    """llama-jax convert SRC DST [--dtype] [--force] [--allow-extra]"""
    # The one place the library reaches up into checkpoints_tools (DESIGN.md's layering).
    from checkpoints_tools import convert

    return convert.run(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    """llama-jax inspect DIR: the config, parameter count, stored dtype and size on disk."""
    import json
    import math

    from llama_jax import orbax_io
    from llama_jax.checkpoint import param_shapes

    path = os.path.abspath(args.path)
    if not os.path.isdir(path):
        return _error(f"{path}: no such directory", 2)
    if not orbax_io.is_converted(path):
        return _error(f"{path}: not a converted checkpoint (no {orbax_io.CONFIG_FILE} and {orbax_io.PARAMS_DIR}/); "
                      "make one with `llama-jax convert`", 2)
    try:
        config = orbax_io.read_config(path)
    except (ValueError, OSError) as e:
        return _error(str(e), 1)
    n_params = sum(math.prod(s) for s in param_shapes(config).values())
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    print(f"path: {path}")
    print(f"parameters: {n_params:,} ({n_params / 1e9:.2f} B)")
    print(f"dtype: {config.param_dtype}")
    print(f"size on disk: {size / 1e6:.1f} MB")
    print("config: " + json.dumps(config.to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from checkpoints_tools import convert

    p = argparse.ArgumentParser(prog="llama-jax", description="Llama 3 in JAX")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    c = sub.add_parser("convert", help="convert a Hugging Face directory or a .gguf file to our checkpoint")
    convert.add_arguments(c)
    c.set_defaults(func=cmd_convert)
    i = sub.add_parser("inspect", help="describe a converted checkpoint")
    i.add_argument("path", metavar="DIR")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `llama-jax` script; returns (and, as a script, exits with) the exit code."""
    args = build_parser().parse_args(argv)  # argparse exits with 2 on usage errors
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
