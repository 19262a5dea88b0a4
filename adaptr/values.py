"""Reading and showing values from users' files: whole numbers, JSON, UTF-8, sizes.

Shared by the registry (adapter and base folders), recipes and data loading, so each kind
of bad input gets one wording wherever it turns up. No heavy imports: the CLI loads it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from adaptr.errors import InvalidInputError

DTYPES = ("auto", "float32", "bfloat16", "float16")  # a base's dtype; "auto": the checkpoint's
WEIGHT_DTYPES = DTYPES[1:]  # what weights are cast or dequantized to (merge, GGUF conversion)


def is_whole(v: Any) -> bool:
    """An int that is not a bool (JSON and YAML ``true`` are ints to Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any, *, finite: bool = True) -> bool:
    """An int or float that is not a bool; finite unless ``finite=False`` (which lets NaN
    and infinities through, e.g. a perplexity that overflowed)."""
    return (
        isinstance(v, (int, float)) and not isinstance(v, bool) and (not finite or math.isfinite(v))
    )


def parse_number(text: str) -> int | float | None:
    """A number-like string as its number (YAML reads ``2e-4`` as a string): an int when it
    is written as one (no ``.`` and no exponent), else a float; None when it is no number."""
    try:
        number = float(text)
    except ValueError:
        return None
    return (
        int(number) if number.is_integer() and not ("." in text or "e" in text.lower()) else number
    )


def human_size(n: int | float | None) -> str:
    """``1.5 MB``-style sizes (powers of 1024); ``-`` for None."""
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TB"


def not_utf8(where: str, line: int, byte: int) -> InvalidInputError:
    return InvalidInputError(
        f"{where} line {line} (byte {byte}) is not valid UTF-8: "
        "re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def decode_utf8(raw: bytes, where: str) -> str:
    """``raw`` as text (a leading BOM dropped), or one line naming the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8(where, raw.count(b"\n", 0, e.start) + 1, e.start) from None


def parse_json(
    text: str | bytes, where: str, kind: str, error: type[InvalidInputError] = InvalidInputError
) -> Any:
    """``json.loads`` with one-line errors: ``where`` is not valid JSON / is nested too deeply."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError:
        raise error(f"{where} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        at = f"line {e.lineno}, column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
        raise error(f"{where} is not valid JSON ({at}: {e.msg})") from None
    except RecursionError:
        raise error(f"{where} is nested too deeply to be {kind}") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise error(f"{where} is not valid JSON ({e})") from None


def ago(ts: float) -> str:
    """How long ago the time ``ts`` (seconds since the epoch) was: ``5m ago``, ``2d ago``."""
    import time

    s = max(0, time.time() - ts)
    for unit, width in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= width:
            return f"{int(s // width)}{unit} ago"
    return "just now"
