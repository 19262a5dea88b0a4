"""Read training data files (JSONL, JSON, CSV, Parquet) and format them into TRL records.

Every problem names the file and the line (or row) and says what to fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, brief
from .formatters import Formatter, MissingField, get_formatter
from .values import decode_utf8, not_utf8, parse_json

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def _utf8_lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line, raising at the first byte that is not UTF-8."""
    offset = 0
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(str(path), n, offset + e.start) from None
            offset += len(raw)
            yield n, text


def read_raw(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for each raw record; ``where`` is 'line N' or 'row N'."""
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"data file {path} does not exist")
    if not path.is_file():
        raise InvalidInputError(f"data file {path} is not a regular file")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, line in _utf8_lines(path):
            if not line.strip():
                continue
            rec = parse_json(line.rstrip("\r\n"), f"{path} line {n}", "a record")
            yield f"line {n}", _object(rec, path, f"line {n}")
    elif suffix == ".json":
        doc = parse_json(decode_utf8(path.read_bytes(), str(path)), str(path), "a list of records")
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            raise InvalidInputError(
                f'{path}: expected a JSON list of records (or {{"data": [...]}})'
            )
        for n, rec in enumerate(doc, 1):
            yield f"record {n}", _object(rec, path, f"record {n}")
    elif suffix in (".csv", ".parquet"):
        import datasets

        if suffix == ".csv":  # before datasets, which logs a traceback for a bad byte
            for _ in _utf8_lines(path):
                pass
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as e:
            raise InvalidInputError(
                f"{path}: cannot read as {suffix[1:]} ({type(e).__name__}: {brief(' '.join(str(e).split()), 200)})"
            ) from None
        for n, rec in enumerate(ds, 1):
            yield f"row {n}", rec
    else:
        raise InvalidInputError(
            f"{path}: unsupported data file type {suffix[:20] or '(none)'}; use {', '.join(SUFFIXES)}"
        )


def _object(rec: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise InvalidInputError(f"{path} {where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def load_records(
    path: str | Path, formatter: str | Formatter, **options: Any
) -> list[dict[str, Any]]:
    """Format every record of a data file; raises naming file, line and field on bad data."""
    fmt = get_formatter(formatter) if isinstance(formatter, str) else formatter
    options = fmt.check_options(options)
    out = []
    for where, raw in read_raw(path):
        try:
            out.append(fmt.format(raw, **options))
        except MissingField as e:
            raise InvalidInputError(f"{path} {where}: {fmt.explain(e)}") from None
        except InvalidInputError as e:
            raise InvalidInputError(f"{path} {where}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise InvalidInputError(
                f"{path} {where}: the {fmt.name} format cannot use this record "
                f"({type(e).__name__}: {brief(str(e))}); check its fields' types"
            ) from None
    if not out:
        raise InvalidInputError(f"data file {path} holds no records")
    return out


def to_dataset(records: list[dict[str, Any]]):
    """A ``datasets.Dataset`` of TRL records. Values whose types differ between records (tool
    call arguments, tool schemas) are kept as JSON, not merged into one Arrow type, which
    would fail or add the other records' keys as nulls."""
    from datasets import Dataset

    return Dataset.from_list(records, on_mixed_types="use_json")
