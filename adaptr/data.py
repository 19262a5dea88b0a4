"""Read training data files (JSONL, JSON, CSV, Parquet) and format them into TRL records.

Every problem names the file and the line (or row) and says what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import InvalidInputError
from .formatters import Formatter, MissingField, get_formatter

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def read_raw(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(where, record)`` for each raw record; ``where`` is 'line N' or 'row N'."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InvalidInputError(
                        f"{path} line {n}: not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                yield f"line {n}", _object(rec, path, f"line {n}")
    elif suffix == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InvalidInputError(
                f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
            ) from None
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

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(suffix[1:], data_files=str(path), split="train")
        except Exception as e:
            raise InvalidInputError(
                f"{path}: cannot read as {suffix[1:]} ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
            ) from None
        for n, rec in enumerate(ds, 1):
            yield f"row {n}", rec
    else:
        raise InvalidInputError(
            f"{path}: unsupported data file type {suffix or '(none)'}; use {', '.join(SUFFIXES)}"
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
            need = f" (the {fmt.name} format needs {', '.join(fmt.fields)})" if fmt.fields else ""
            raise InvalidInputError(f"{path} {where}: {e}{need}") from None
        except InvalidInputError as e:
            raise InvalidInputError(f"{path} {where}: {e}") from None
    if not out:
        raise InvalidInputError(f"data file {path} holds no records")
    return out


def to_dataset(records: list[dict[str, Any]]):
    """A ``datasets.Dataset`` of TRL records."""
    from datasets import Dataset

    return Dataset.from_list(records)
