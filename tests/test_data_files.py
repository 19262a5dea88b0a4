"""Data files are read as the text they hold: CSV cells as strings, Parquet values checked,
JSON Lines in a .json file read as JSON Lines, NaN and other non-text values refused with the
record and field (adaptr.data.files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adaptr.data.files import load_records, read_raw, record_kind, text_value
from adaptr.errors import InvalidInputError
from adaptr.extend.types import Formatter, MissingField

from helpers import refused

DATA = Path(__file__).parent / "data"
# answers a type-inferring reader turns into 7, 2201, 1.5, NaN and NaN
ANSWERS = ["007", "02201", "1.50", "NA", "null"]


def preview_json(cli, base: Path, data: Path, fmt: str, *options: str, count: int = 5) -> dict:
    flags = [a for o in options for a in ("--format-option", o)]
    code, out, err = cli("train", "--base", str(base), "--data", str(data), "--format", fmt, *flags,
                         "--name", "p", "--preview", str(count), "--json")  # fmt: skip
    assert code == 0, err
    return json.loads(out)


def loss_texts(doc: dict) -> list[str]:
    return ["".join(s["text"] for s in ex["segments"] if s["loss"]) for ex in doc["examples"]]


# ---- CSV: every cell is the text written in it ----


def test_csv_answers_keep_their_text(cli, tiny_llama):
    records = load_records(DATA / "answers.csv", "alpaca", lang="en")
    assert [r["completion"] for r in records] == ANSWERS
    assert "### Input:\nprice list: bread 1.50\n\n" in records[2]["prompt"]
    doc = preview_json(cli, tiny_llama, DATA / "answers.csv", "alpaca", "lang=en")
    assert loss_texts(doc) == [a + "<|endoftext|>" for a in ANSWERS]  # what trains


def test_csv_empty_cells_and_ragged_rows(tmp_path, cli, home, tiny_llama):
    empty = tmp_path / "empty.csv"
    empty.write_text('instruction,output\n"Say hi.",hi\n"Say nothing.",\n')
    with pytest.raises(InvalidInputError, match=r"empty\.csv row 2: field 'output' is empty"):
        load_records(empty, "alpaca")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("instruction,output\nSay hi, please.,hi\n")
    refused(cli, home, None, "train", "--base", str(tiny_llama), "--data", str(ragged), "--format", "alpaca",
            "--name", "r", "--preview", match="row 1 (line 2) has 3 cells but the header names 2 columns")  # fmt: skip
    twice = tmp_path / "twice.csv"
    twice.write_text("output,output\na,b\n")
    with pytest.raises(InvalidInputError, match="column 'output' is named twice"):
        list(read_raw(twice))
    # quoted cells keep commas, newlines and quotes; a BOM and CRLF line ends are read through
    quoted = tmp_path / "quoted.csv"
    quoted.write_bytes('\ufeffinstruction,output\r\n"List, please.","a\r\nb ""c"""\r\n'.encode())
    assert list(read_raw(quoted)) == [
        ("row 1", {"instruction": "List, please.", "output": 'a\r\nb "c"'})
    ]


# ---- Parquet: strings stay strings; whole numbers are their digits; floats are refused ----


def test_parquet_values(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"instruction": ["Agent number?", "Code?"], "output": ["007", "02201"],
                             "count": [7, 2201], "price": [1.5, None]}), path)  # fmt: skip
    assert [r["completion"] for r in load_records(path, "alpaca")] == ["007", "02201"]
    ints = load_records(
        path, "prompt-completion", prompt_field="instruction", completion_field="count"
    )
    assert [r["completion"] for r in ints] == ["7", "2201"]
    with pytest.raises(InvalidInputError) as e:
        load_records(
            path, "prompt-completion", prompt_field="instruction", completion_field="price"
        )
    assert "d.parquet row 1: field 'price' is the number 1.5, not text" in str(e.value)
    assert "write it as a string" in str(e.value)


# ---- JSON ----


def test_json_lines_in_a_json_file_are_read_as_json_lines(cli, tiny_llama, tmp_path):
    path = DATA / "jsonl_in_a.json"
    with pytest.raises(json.JSONDecodeError, match="Extra data"):
        json.loads(path.read_text())
    assert [w for w, _ in read_raw(path)] == ["line 1", "line 2"]
    assert [r["completion"] for r in load_records(path, "alpaca")] == ["Hello.", "Goodbye."]
    doc = preview_json(cli, tiny_llama, path, "alpaca")
    assert loss_texts(doc) == ["Hello.<|endoftext|>", "Goodbye.<|endoftext|>"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output":\n')
    with pytest.raises(InvalidInputError) as e:
        list(read_raw(bad))
    message = str(e.value)
    assert (
        message.startswith(f"{bad} is neither one JSON document")
        and "nor JSON Lines (line 2 is not valid JSON" in message
    )


def test_nan_in_json_lines_is_refused_not_trained_as_nan(cli, home, tiny_llama, tmp_path):
    data = tmp_path / "nan.jsonl"  # Python's json.dumps writes NaN for float('nan')
    data.write_text(json.dumps({"instruction": "Say hi.", "input": "", "output": "hi"}) + "\n"
                    + json.dumps({"instruction": "Sum the column.", "input": float("nan"), "output": "0"}) + "\n")  # fmt: skip
    with pytest.raises(
        InvalidInputError,
        match=r"nan\.jsonl line 2: field 'input' is nan \(not a number\), not text",
    ):
        load_records(data, "alpaca")
    refused(cli, home, None, "train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
            "--name", "n", "--preview", match="line 2: field 'input' is nan (not a number)")  # fmt: skip


# ---- text values and record kinds ----


@pytest.mark.parametrize(
    "value, why",
    [
        (["a", "b"], "is a list (['a', 'b']), not text: give one string"),
        ({"k": 1}, "is an object ({'k': 1}), not text"),
        (True, "is true (a boolean), not text"),
        (1.5, "is the number 1.5, not text"),
        (float("inf"), "is inf (not a number), not text"),
    ],
)
def test_text_value_refuses_what_is_not_text(value, why):
    with pytest.raises(MissingField) as e:
        text_value(value, "output")
    assert str(e.value).startswith(f"field 'output' {why}")
    assert text_value("007", "output") == "007" and text_value(42, "output") == "42"


def test_one_file_trains_one_kind_of_record(tmp_path):
    def half_and_half(record):
        return (
            {"text": record["t"]}
            if record["n"] == 1
            else {"prompt": "p", "completion": record["t"]}
        )

    path = tmp_path / "d.jsonl"
    path.write_text('{"n": 1, "t": "a"}\n{"n": 2, "t": "b"}\n')
    mixed = Formatter("half", half_and_half, kind="text")
    with pytest.raises(InvalidInputError) as e:
        load_records(path, mixed)
    assert str(e.value) == (
        f"{path} line 2: the half format made a prompt-completion record of it, but a text record "
        "of line 1: one data file trains one kind of record; give every record the same shape"
    )
    with pytest.raises(
        InvalidInputError, match="a TRL record has 'text', 'prompt' and 'completion', or 'messages'"
    ):
        load_records(path, Formatter("bad", lambda r: {"answer": "x"}))
    assert record_kind({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "assistant", "content": "a"}]}) == "conversational prompt-completion"  # fmt: skip
    with pytest.raises(InvalidInputError, match="one is a list of messages and the other text"):
        record_kind({"prompt": [{"role": "user", "content": "q"}], "completion": "a"})


# ------------------------------------------------------------------ datasets
@pytest.mark.parametrize(
    "name, content, match",
    [
        pytest.param("d.jsonl", b'{"instruction": "a", "output": "b"}\n' * 2 + b'{"instruction": "caf\xe9", "output": "b"}\n',
                     "d.jsonl line 3 (byte 92) is not valid UTF-8: re-encode it as UTF-8", id="jsonl"),
        pytest.param("d.json", b'[\n{"instruction": "a", "output": "b"},\n{"instruction": "\xff", "output": "b"}]\n',
                     "d.json line 3 (byte 56) is not valid UTF-8", id="json"),
        pytest.param("d.csv", b"instruction,output\na,b\n\xe9t\xe9,b\n", "d.csv line 3 (byte 23) is not valid UTF-8", id="csv"),
        pytest.param("d.jsonl", b"[" * 100_000 + b"]" * 100_000 + b"\n", "d.jsonl line 1 is nested too deeply to be a record", id="deep-jsonl"),
        pytest.param("d.json", b"[" * 100_000 + b"]" * 100_000, "d.json is nested too deeply to be a list of records", id="deep-json"),
    ],
)  # fmt: skip
def test_hostile_datasets(cli, home, tmp_path, populated, name, content, match):
    data = tmp_path / name
    data.write_bytes(content)
    args = ("--base", "org/model", "--data", str(data), "--format", "alpaca", "--name", "x")
    refused(cli, home, populated, "train", *args, match=match)
    from adaptr.data.files import load_records

    with pytest.raises(InvalidInputError, match=re.escape(match)):
        load_records(data, "alpaca")


def test_a_utf8_bom_is_not_an_error(tmp_path):
    from adaptr.data.files import load_records

    data = tmp_path / "bom.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"instruction": "a", "output": "b"}\n')
    assert len(load_records(data, "alpaca")) == 1


def test_a_formatter_that_trips_over_a_record_names_it(tmp_path, register_plugin):
    from adaptr import Formatter, hookimpl
    from adaptr.data.files import load_records

    class Plugin:
        @hookimpl
        def adaptr_register_formatters(self, register):
            register(Formatter(name="strict", format=lambda r: {"text": r["a"] + 1}, kind="text"))

    register_plugin(Plugin(), "strict-formatter")
    data = tmp_path / "d.jsonl"
    data.write_text('{"a": 1}\n{"a": "x"}\n')
    with pytest.raises(
        InvalidInputError, match="d.jsonl line 2: the strict format cannot use this"
    ):
        load_records(data, "strict")
