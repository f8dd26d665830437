"""A small, lazy safetensors reader: one header parse, then memory-mapped tensors.

We parse the format ourselves (8-byte little-endian header size, a JSON header, raw data) rather than
using safetensors' numpy frontend: numpy has no bfloat16 there, and a memory map lets the loader and
the converter read one tensor at a time, checking every offset against the file's size first, so a
truncated file is a clear error naming it instead of a crash half-way.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    pass


class SafetensorsFile:
    """Tensors of one .safetensors file: `names`, `shape(name)`, `dtype(name)`, `get(name)` (a
    read-only memory-mapped numpy array)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw = f.read(8)
                if len(raw) < 8:
                    raise SafetensorsError(f"{self.path}: truncated safetensors file (no header)")
                (n,) = struct.unpack("<Q", raw)
                if n > _MAX_HEADER or 8 + n > size:
                    raise SafetensorsError(f"{self.path}: truncated or corrupt safetensors header")
                header = json.loads(f.read(n))
        except OSError as e:
            raise SafetensorsError(f"{self.path}: cannot read ({e.strerror})") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SafetensorsError(f"{self.path}: corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", None) or {}
        self._start = 8 + n
        self._info = {}
        data_size = size - self._start
        for name, info in header.items():
            dtype = _DTYPES.get(info.get("dtype"))
            if dtype is None:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
            if end > data_size:
                raise SafetensorsError(
                    f"{self.path}: truncated safetensors file (tensor {name!r} ends at byte "
                    f"{self._start + end}, the file has {size})")
            if end - begin != int(np.prod(shape)) * np.dtype(dtype).itemsize:
                raise SafetensorsError(f"{self.path}: tensor {name!r} has a size that does not match its shape")
            self._info[name] = (np.dtype(dtype), shape, begin)
        self._mmap = None

    @property
    def names(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._info[name][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, begin = self._info[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        count = int(np.prod(shape))
        buf = self._mmap[self._start + begin: self._start + begin + count * dtype.itemsize]
        return buf.view(dtype).reshape(shape)

    def close(self) -> None:
        self._mmap = None

