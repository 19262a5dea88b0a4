"""Read and validate a safetensors file's header without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor
names to dtype, shape and byte offsets, then the raw data. Checking the header against the
file size catches truncated and corrupt files in microseconds, before anything is stored.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import InvalidInputError

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: str | Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Return ``(tensors, metadata)`` of a safetensors file, raising on any inconsistency."""
    path = Path(path)

    def bad(why: str) -> InvalidInputError:
        return InvalidInputError(
            f"{path} is not a valid safetensors file ({why}); re-save it with safetensors"
        )

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad("shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise bad("header length points past the end of the file: truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise bad("header is not valid JSON") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(d) for d in shape)
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r} has a malformed entry") from None
        if dtype not in DTYPE_BYTES:
            raise bad(f"tensor {name!r} has unknown dtype {dtype!r}")
        if any(d < 0 for d in shape) or not (0 <= begin <= end):
            raise bad(f"tensor {name!r} has a negative size or offset")
        if (end - begin) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {dtype}")
        tensors[name] = TensorInfo(dtype, shape)
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise bad("tensor data overlaps or leaves gaps")
        pos = end
    if 8 + n + pos != size:
        raise bad(
            f"data is {size - 8 - n} bytes but the header describes {pos}: truncated or padded"
        )
    return tensors, metadata
