"""Built-in formatters and data loading: TRL records out, file/line/field in every error."""

import json

import pytest

from adaptr.data import load_records, read_raw
from adaptr.errors import InvalidInputError
from adaptr.formatters import formatters, get_formatter


def fmt(name, record, **options):
    return get_formatter(name)(record, **options)


def test_text():
    assert fmt("text", {"text": "hi"}) == {"text": "hi"}
    assert fmt("text", {"quote": "q"}, field="quote") == {"text": "q"}


def test_alpaca_seed_layout_and_english():
    rec = {"instruction": "把下面的中文翻译成英文。", "input": "你好", "output": "hello"}
    assert fmt("alpaca", rec) == {
        "prompt": "### 指令:\n把下面的中文翻译成英文。\n\n### 输入:\n你好\n\n### 回答:\n",
        "completion": "hello",
    }
    no_input = fmt("alpaca", {"instruction": "说你好", "output": "你好"})
    assert no_input["prompt"] == "### 指令:\n说你好\n\n### 回答:\n"
    en = fmt("alpaca", rec, lang="en")
    assert en["prompt"].endswith(
        "### Instruction:\n把下面的中文翻译成英文。\n\n### Input:\n你好\n\n### Response:\n"
    )


def test_dolly_uses_context_as_input():
    out = fmt(
        "dolly", {"instruction": "Summarise", "context": "A long text.", "response": "Short."}
    )
    assert "### Input:\nA long text." in out["prompt"] and out["completion"] == "Short."


def test_sharegpt_and_messages_keep_structure():
    conv = {
        "conversations": [
            {"from": "system", "value": "be kind"},
            {"from": "human", "value": "hi"},
            {"from": "gpt", "value": "hello"},
        ]
    }
    assert fmt("sharegpt", conv) == {
        "messages": [
            {"role": "system", "content": "be kind"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ]
    }
    msgs = {
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    }
    assert fmt("messages", msgs) == msgs


def test_prompt_completion_and_translation():
    assert fmt(
        "prompt-completion", {"q": "2+2=", "a": "4"}, prompt_field="q", completion_field="a"
    ) == {"prompt": "2+2=", "completion": "4"}
    out = fmt("translation", {"zh": "你好", "en": "hello"}, direction="zh-en")
    assert out == {"prompt": "Translate from Chinese to English:\n你好\n", "completion": "hello"}
    rev = fmt("translation", {"zh": "你好", "en": "hello"}, direction="en-zh")
    assert rev == {"prompt": "Translate from English to Chinese:\nhello\n", "completion": "你好"}
    generic = fmt(
        "translation",
        {"source": "Bonjour", "target": "Hello", "source_lang": "French", "target_lang": "English"},
    )
    assert generic["prompt"].startswith("Translate from French to English")


def test_every_formatter_emits_a_trl_record():
    kinds = {
        "text": {"text"},
        "prompt-completion": {"prompt", "completion"},
        "messages": {"messages"},
    }
    samples = {
        "text": {"text": "x"}, "alpaca": {"instruction": "i", "output": "o"}, "dolly": {"instruction": "i", "response": "r"},
        "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "prompt-completion": {"prompt": "p", "completion": "c"}, "translation": {"source": "s", "target": "t"},
    }  # fmt: skip
    for name, f in formatters().items():
        if name in samples:
            assert set(f(samples[name])) == kinds[f.kind], name


@pytest.mark.parametrize(
    "name, record, match",
    [
        ("alpaca", {"instruction": "i"}, "field 'output' is missing"),
        ("alpaca", {"instruction": "i", "output": "  "}, "field 'output' is empty"),
        ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "has no assistant turn"),
        ("messages", {"messages": [{"role": "user"}]}, "needs 'role' and 'content'"),
        ("translation", {"zh": "你好"}, "field 'en' is missing"),
    ],
)
def test_record_errors_name_the_field(name, record, match):
    opts = {"direction": "zh-en"} if name == "translation" else {}
    with pytest.raises(InvalidInputError, match=match.replace("[", r"\[").replace("]", r"\]")):
        fmt(name, record, **opts)


ROWS = [
    {"instruction": "说你好", "input": "", "output": "你好"},
    {"instruction": "翻译", "input": "猫", "output": "cat"},
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_file_types(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        path.write_text(
            "\n".join(json.dumps(r, ensure_ascii=False) for r in ROWS) + "\n\n", encoding="utf-8"
        )
    elif suffix == ".json":
        path.write_text(json.dumps(ROWS, ensure_ascii=False), encoding="utf-8")
    else:
        from datasets import Dataset

        ds = Dataset.from_list(ROWS)
        ds.to_csv(str(path), index=False) if suffix == ".csv" else ds.to_parquet(str(path))
    records = load_records(path, "alpaca")
    assert [r["completion"] for r in records] == ["你好", "cat"]
    assert records[1]["prompt"] == "### 指令:\n翻译\n\n### 输入:\n猫\n\n### 回答:\n"


def test_shipped_example_data_loads():
    from pathlib import Path

    data = Path(__file__).parent.parent / "examples" / "data"
    assert len(load_records(data / "translate_zh_en.jsonl", "alpaca")) == 24
    quotes = load_records(data / "quotes.jsonl", "text", field="quote")
    assert len(quotes) == 24 and quotes[0] == {
        "text": "Be yourself; everyone else is already taken."
    }


@pytest.mark.parametrize(
    "content, match",
    [
        (
            '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"\n',
            "line 2 is not valid JSON (column",
        ),
        (
            '{"instruction": "a", "output": "b"}\n\n{"instruction": "c"}\n',
            "line 3: field 'output' is missing (the alpaca format needs instruction, output)",
        ),
        ('["not", "an", "object"]\n', "line 1: expected a JSON object, got list"),
        ("\n\n", "holds no records"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(InvalidInputError) as e:
        load_records(path, "alpaca")
    assert str(e.value).startswith(str(path)) or str(e.value).startswith(f"data file {path}")
    assert match in str(e.value)


def test_missing_file_unknown_format_unknown_option(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        list(read_raw(tmp_path / "nope.jsonl"))
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(InvalidInputError, match="unsupported data file type .txt"):
        list(read_raw(tmp_path / "d.txt"))
    with pytest.raises(InvalidInputError, match="did you mean 'alpaca'"):
        get_formatter("alpacca")
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(InvalidInputError, match="format text has no option 'colour'"):
        load_records(tmp_path / "d.jsonl", "text", colour="red")


def test_formatters_cli_json(cli):
    code, out, _ = cli("formatters", "--json")
    names = {f["name"]: f for f in json.loads(out)["formatters"]}
    assert (
        code == 0
        and names["alpaca"]["kind"] == "prompt-completion"
        and names["alpaca"]["options"] == {"lang": "zh"}
    )
    assert names["sharegpt"]["plugin"] == "formatters"
