"""Meta's Llama 3 `tokenizer.model`, rebuilt for tests from the vocab that `quicktok-v1` bundles."""

import base64
import hashlib
import os
import struct
import tempfile
from pathlib import Path

# The sha256 published for Meta's Llama 3 / 3.1 tokenizer.model.
LLAMA3_TOKENIZER_SHA256 = "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"


def build_llama3_tokenizer_model(dst: str | os.PathLike) -> Path:
    """Writes Meta's Llama 3 `tokenizer.model` rebuilt from the vocab bundled with `quicktok-v1`.

    Meta's file is gated; quicktok ships the same 128000 ranks. Checks the sha256 published for
    Meta's file and writes atomically (temp file + rename). Returns `dst`.
    """
    from importlib.resources import files

    data = files("quicktok").joinpath("data/llama3.vocab").read_bytes()
    (count,) = struct.unpack_from("<I", data, 0)
    lines, offset = [], 4
    for _ in range(count):  # u16 length, the bytes, u32 rank
        (length,) = struct.unpack_from("<H", data, offset)
        token = data[offset + 2 : offset + 2 + length]
        (rank,) = struct.unpack_from("<I", data, offset + 2 + length)
        offset += 2 + length + 4
        lines.append((rank, base64.b64encode(token) + b" %d\n" % rank))
    lines.sort()
    content = b"".join(line for _, line in lines)
    digest = hashlib.sha256(content).hexdigest()
    if digest != LLAMA3_TOKENIZER_SHA256:
        raise ValueError(f"rebuilt tokenizer.model has sha256 {digest}, not Meta's")

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=dst.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise
    return dst
