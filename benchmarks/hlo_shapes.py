"""The bytes of a shape in XLA's HLO text, for the scripts that read compiled programs
(benchmarks/gpu_compile.py, benchmarks/parallel.py)."""

from __future__ import annotations

import math
import re

DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")


def shape_bytes(shape: str) -> int:
    """Bytes of every array in `shape` ('f32[2,3]' or a tuple '(bf16[4], s32[])'); an element type
    not in DTYPE_BYTES counts 4 bytes."""
    return sum(DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dt, dims in _ARRAY.findall(shape))
