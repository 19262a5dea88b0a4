"""Read training data files (JSONL, JSON, CSV, Parquet) and format them into TRL records.

Every problem names the file and the line (or row) and says what to fix.

Values keep the text the file holds: CSV cells are read as strings (``007`` stays ``007``,
``NA`` and ``null`` stay words; only an empty cell is empty), JSON Lines in a ``.json`` file
is read as JSON Lines (as ``datasets`` does), and formatters take a field as text only when
it is text (:func:`text_value`): lists, objects, booleans, floats and NaN are refused with
the record and field, never trained as their Python ``str()``.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError, brief
from adaptr.extend.catalog import get_formatter
from adaptr.extend.types import Formatter, MissingField
from adaptr.values import decode_utf8, not_utf8, parse_json

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
CSV_FIELD_LIMIT = 2**31 - 1  # the csv module's default (128 KiB a cell) is below a long answer


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
    """Yield ``(where, record)`` for each raw record; ``where`` is 'line N', 'record N' or 'row N'."""
    from adaptr.registry.atomic import check_path, regular_file

    check_path(str(path), "data file")
    path = Path(path)
    if not path.exists():
        raise InvalidInputError(f"data file {path} does not exist")
    path = regular_file(path, "data file")  # a device, a pipe, a folder: said what it is
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _json_lines(path, _utf8_lines(path))
    elif suffix == ".json":
        yield from _json(path)
    elif suffix == ".csv":
        yield from _csv(path)
    elif suffix == ".parquet":
        yield from _parquet(path)
    else:
        raise InvalidInputError(
            f"{path}: unsupported data file type {suffix[:20] or '(none)'}; use {', '.join(SUFFIXES)}"
        )


def _json_lines(path: Path, lines) -> Iterator[tuple[str, dict[str, Any]]]:
    for n, line in lines:
        if not line.strip():
            continue
        rec = parse_json(line.rstrip("\r\n"), f"{path} line {n}", "a record")
        yield f"line {n}", _object(rec, path, f"line {n}")


def _json(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    text = decode_utf8(path.read_bytes(), str(path))
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            # one object per line in a .json file: datasets reads it as JSON Lines, so do we
            try:
                rows = list(_json_lines(path, enumerate(text.split("\n"), 1)))
            except InvalidInputError as lines:
                raise InvalidInputError(
                    f"{path} is neither one JSON document (a second value starts at line "
                    f"{e.lineno}, column {e.colno}) nor JSON Lines ({str(lines).removeprefix(f'{path} ')}): "
                    "give a JSON list of records, or one record per line"
                ) from None
            yield from rows
            return
        doc = parse_json(text, str(path), "a list of records")  # raises the one-line error
    except (RecursionError, ValueError):
        doc = parse_json(text, str(path), "a list of records")
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise InvalidInputError(f'{path}: expected a JSON list of records (or {{"data": [...]}})')
    for n, rec in enumerate(doc, 1):
        yield f"record {n}", _object(rec, path, f"record {n}")


def _csv(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every cell as the text it holds: no number or NA inference (pandas reads ``007`` as 7
    and ``NA`` as missing); a row whose cell count differs from the header's is refused."""
    for _ in _utf8_lines(path):  # the first bad byte, named by line
        pass
    csv.field_size_limit(CSV_FIELD_LIMIT)
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if not header or not any(h.strip() for h in header):
                raise InvalidInputError(f"{path}: no header row naming the columns")
            seen: set[str] = set()
            for name in header:
                if name in seen:
                    raise InvalidInputError(
                        f"{path}: column {brief(name)} is named twice in the header; give each column its own name"
                    )
                seen.add(name)
            n = 0
            for row in reader:
                if not row:  # a blank line
                    continue
                n += 1
                if len(row) != len(header):
                    raise InvalidInputError(
                        f"{path} row {n} (line {reader.line_num}) has {len(row)} cells but the header "
                        f"names {len(header)} columns: quote cells that hold commas or newlines"
                    )
                yield f"row {n}", dict(zip(header, row, strict=True))
        except csv.Error as e:
            raise InvalidInputError(
                f"{path} line {reader.line_num}: cannot read as CSV ({brief(str(e), 200)})"
            ) from None


def _parquet(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Parquet rows as Python values (strings stay strings, nested lists and structs become
    lists and dicts); numbers are left to the formatters, which take whole numbers as text
    and refuse floats (a float keeps no written form: 1.5 or 1.50?)."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for rec in batch.to_pylist():
                n += 1
                yield f"row {n}", rec
    except InvalidInputError:
        raise
    except Exception as e:
        raise InvalidInputError(
            f"{path}: cannot read as parquet ({type(e).__name__}: {brief(' '.join(str(e).split()), 200)})"
        ) from None


def _object(rec: Any, path: Path, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise InvalidInputError(f"{path} {where}: expected a JSON object, got {type(rec).__name__}")
    return rec


def text_value(value: Any, field: str, hint: str = "") -> str:
    """``value`` as the text to train, if it is text (a whole number is its digits); raises
    :class:`MissingField` naming ``field`` for a list, object, boolean, float, NaN or other
    type, whose ``str()`` would be trained otherwise. ``hint`` ends the message."""
    if isinstance(value, str):
        return value
    end = f": {hint}" if hint else ""
    if isinstance(value, bool):
        why = f"is {str(value).lower()} (a boolean), not text{end or ': write it as a string'}"
    elif isinstance(value, int):
        return str(value)
    elif isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            why = f"is {value!r} (not a number), not text{end or ': give the text, or leave the field out'}"
        else:
            why = (
                f"is the number {value!r}, not text (a float keeps no written form: 1.5 or 1.50?)"
                f"{end or ': write it as a string'}"
            )
    elif isinstance(value, list):
        why = f"is a list ({brief(value, 60)}), not text{end or ': give one string'}"
    elif isinstance(value, dict):
        why = f"is an object ({brief(value, 60)}), not text{end or ': give one string'}"
    else:
        why = f"is a {type(value).__name__}, not text{end or ': store it as a string'}"
    raise MissingField(field, why)


def record_kind(rec: Any) -> str:
    """The TRL dataset type of a formatted record: 'text', 'prompt-completion',
    'conversational prompt-completion' or 'messages'; raises on anything else."""
    if not isinstance(rec, dict):
        raise InvalidInputError(f"the formatter returned {type(rec).__name__}, not a TRL record")
    if "messages" in rec:
        return "messages"
    if "chosen" in rec and "rejected" in rec:
        return "preference"  # DPO, ORPO (adaptr.data.preference)
    if "label" in rec and "completion" in rec:
        return "unpaired-preference"  # KTO
    if "prompt" in rec and "completion" in rec:
        lists = isinstance(rec["prompt"], list), isinstance(rec["completion"], list)
        if lists == (True, True):
            return "conversational prompt-completion"
        if lists == (False, False):
            return "prompt-completion"
        raise InvalidInputError(
            "the formatter returned a prompt and a completion of which one is a list of messages "
            "and the other text: give both as messages or both as text"
        )
    if "text" in rec:
        return "text"
    raise InvalidInputError(
        f"the formatter returned a record with {', '.join(map(repr, rec)) or 'no fields'}: a TRL "
        "record has 'text', 'prompt' and 'completion', or 'messages'"
    )


def kind_of(records: list[dict[str, Any]]) -> str:
    """What the loss defaults go by: 'text', 'prompt-completion' (conversational or not) or
    'messages' (see :func:`record_kind`)."""
    kind = record_kind(records[0]) if records else "text"
    return "prompt-completion" if kind.endswith("prompt-completion") else kind


def load_records(
    path: str | Path, formatter: str | Formatter, **options: Any
) -> list[dict[str, Any]]:
    """Format every record of a data file; raises naming file, line and field on bad data.
    Every record is of one TRL type (see :func:`record_kind`)."""
    fmt = get_formatter(formatter) if isinstance(formatter, str) else formatter
    options = fmt.check_options(options)
    out = []
    first: tuple[str, str] | None = None  # (where, kind) of the first record
    for where, raw in read_raw(path):
        try:
            rec = fmt.format(raw, **options)
            kind = record_kind(rec)
        except MissingField as e:
            raise InvalidInputError(f"{path} {where}: {fmt.explain(e)}") from None
        except InvalidInputError as e:
            raise InvalidInputError(f"{path} {where}: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise InvalidInputError(
                f"{path} {where}: the {fmt.name} format cannot use this record "
                f"({type(e).__name__}: {brief(str(e))}); check its fields' types"
            ) from None
        if first is None:
            first = (where, kind)
        elif kind != first[1]:
            raise InvalidInputError(
                f"{path} {where}: the {fmt.name} format made a {kind} record of it, but a "
                f"{first[1]} record of {first[0]}: one data file trains one kind of record; "
                "give every record the same shape"
            )
        out.append(rec)
    if not out:
        raise InvalidInputError(f"data file {path} holds no records")
    return out


def to_dataset(records: list[dict[str, Any]]):
    """A ``datasets.Dataset`` of TRL records. Values whose types differ between records (tool
    call arguments, tool schemas) are kept as JSON, not merged into one Arrow type, which
    would fail or add the other records' keys as nulls."""
    from datasets import Dataset

    return Dataset.from_list(records, on_mixed_types="use_json")
