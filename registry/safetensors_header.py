"""Read and validate a safetensors file's header without torch.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping tensor
names to dtype, shape and byte offsets, then the raw data. Checking the header against the
file size catches truncated and corrupt files in microseconds, before anything is stored.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import InvalidInputError, brief
from adaptr.values import parse_json

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS = 16


def _is_count(value) -> bool:
    """A JSON integer >= 0 (not a bool, float or string), as the safetensors format requires."""
    return type(value) is int and 0 <= value < 2**64


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
        header = parse_json(raw, "its header", "a tensor table")
    except InvalidInputError as e:
        raise bad(str(e)) from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ is not a mapping of strings")
    tensors: dict[str, TensorInfo] = {}
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise bad(
                f"tensor {brief(name)} has a malformed entry (needs dtype, shape, data_offsets)"
            )
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
            raise bad(f"tensor {brief(name)} has unknown dtype {brief(dtype)}")
        if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(map(_is_count, shape)):
            raise bad(f"tensor {brief(name)} has shape {brief(shape)}: not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
            raise bad(f"tensor {brief(name)} has data_offsets {brief(offsets)}: not [begin, end]")
        begin, end = offsets
        if begin > end:
            raise bad(f"tensor {brief(name)} ends before it begins")
        if (end - begin) != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise bad(
                f"tensor {brief(name)} has {end - begin} bytes for shape {brief(shape)} {dtype}"
            )
        tensors[name] = TensorInfo(dtype, tuple(shape))
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


def write_renamed(src: str | Path, dest: str | Path, renames: dict[str, str]) -> None:
    """Copy the safetensors file ``src`` to ``dest`` (fsynced) with tensors renamed.

    Only the JSON header is rewritten (padded with spaces to 8 bytes, as safetensors
    writes it); the tensor data is copied byte for byte, so no tensor library is needed.
    The copy is not checked here: the caller reads it back with :func:`read_header`.
    """
    import json
    import os
    import shutil

    with Path(src).open("rb") as fin:
        (n,) = struct.unpack("<Q", fin.read(8))
        if n > MAX_HEADER:
            raise InvalidInputError(f"{src} is not a valid safetensors file (header too long)")
        header = parse_json(fin.read(n), str(src), "a tensor table")
        if not isinstance(header, dict):
            raise InvalidInputError(f"{src} is not a valid safetensors file (header not an object)")
        renamed = {renames.get(k, k): v for k, v in header.items()}
        raw = json.dumps(renamed, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with Path(dest).open("wb") as fout:
            fout.write(struct.pack("<Q", len(raw)) + raw)
            shutil.copyfileobj(fin, fout, 8 << 20)
            fout.flush()
            os.fsync(fout.fileno())
