"""Built-in formatters and data loading: TRL records out, file/line/field in every error."""

import json
import re
from pathlib import Path

import pytest

from adaptr.data.files import load_records, read_raw
from adaptr.errors import InvalidInputError
from adaptr.extend.catalog import formatters, get_formatter
from adaptr.extend.types import MissingField


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
        "preference": {"prompt", "chosen", "rejected"},
        "unpaired-preference": {"prompt", "completion", "label"},
    }
    samples = {
        "text": {"text": "x"}, "alpaca": {"instruction": "i", "output": "o"}, "dolly": {"instruction": "i", "response": "r"},
        "sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        "messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "prompt-completion": {"prompt": "p", "completion": "c"}, "translation": {"source": "s", "target": "t"},
        "preference": {"prompt": "p", "chosen": "c", "rejected": "r"},
        "sharegpt-preference": {"conversations": [{"from": "human", "value": "a"}],
                                "chosen": {"from": "gpt", "value": "b"}, "rejected": {"from": "gpt", "value": "c"}},
        "alpaca-preference": {"instruction": "i", "chosen": "c", "rejected": "r"},
        "kto": {"prompt": "p", "completion": "c", "label": True},
    }  # fmt: skip
    loaded = formatters()
    assert set(samples) <= set(loaded), sorted(set(samples) - set(loaded))  # every built-in loaded
    builtin = {name for name, f in loaded.items() if f.plugin == "formatters"}
    assert builtin == set(samples), sorted(builtin ^ set(samples))  # and each has its sample here
    for name, sample in samples.items():
        f = loaded[name]
        assert set(f(sample)) == kinds[f.kind], name


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


# ---- every TRL dataset type: trained as TRL trains it, or refused naming what takes it ----

DATA = Path(__file__).parent / "data"
TRL_TYPES = json.loads((DATA / "trl_dataset_formats.json").read_text())  # TRL's dataset_formats doc
SKY = [{"role": "user", "content": "What color is the sky?"}]
TRAINED = {  # type -> (format, TRL record adaptr trains)
    "language modeling": ("text", {"text": "The sky is blue."}),
    "conversational language modeling": ("messages", {"messages": SKY + [{"role": "assistant", "content": "It is blue."}]}),
    "prompt-completion": ("prompt-completion", {"prompt": "The sky is", "completion": " blue."}),
    "conversational prompt-completion": ("prompt-completion", {"prompt": SKY, "completion": [{"role": "assistant", "content": "It is blue."}]}),
}  # fmt: skip
REFUSED = {  # type -> what the refusal names
    "prompt-only": "prompt-only data, for online methods (TRL's GRPOTrainer, RLOOTrainer), not SFT",
    "conversational prompt-only": "prompt-only data, for online methods",
    "preference": "preference data ('chosen' and 'rejected'), for DPO or ORPO (TRL's DPOTrainer)",
    "implicit-prompt preference": "for DPO or ORPO (TRL's DPOTrainer)",
    "conversational preference": "for DPO or ORPO (TRL's DPOTrainer)",
    "conversational implicit-prompt preference": "for DPO or ORPO (TRL's DPOTrainer)",
    "unpaired preference": "'label' (true) marks unpaired preference data, for KTO (TRL's KTOTrainer)",
    "conversational unpaired preference": "'label' (false) marks unpaired preference data, for KTO",
    "stepwise supervision": "stepwise supervision ('completions' steps with 'labels'), which is for process reward models",
}  # fmt: skip


def test_every_trl_dataset_type_is_handled_or_refused():
    assert set(TRAINED) | set(REFUSED) == set(TRL_TYPES)
    for kind, (name, expected) in TRAINED.items():
        assert fmt(name, TRL_TYPES[kind][0]) == expected, kind
    for kind, why in REFUSED.items():
        name = (
            "messages"
            if kind.startswith("conversational") and "preference" in kind
            else "prompt-completion"
        )
        with pytest.raises(InvalidInputError) as e:
            fmt(name, TRL_TYPES[kind][0])
        assert why in str(e.value), (kind, str(e.value))
        if "preference" in kind:
            assert (
                "SFT takes neither preference nor unpaired-preference data (train it with --method dpo"
                in str(e.value)
            )


def test_preference_mapped_on_purpose_trains_the_chosen_answer():
    rec = TRL_TYPES["conversational implicit-prompt preference"][0]
    with pytest.raises(
        InvalidInputError,
        match="to fine-tune on the chosen answers, map them with --format-option field=chosen",
    ):
        fmt("messages", rec)
    assert fmt("messages", rec, field="chosen") == {"messages": rec["chosen"]}
    pref = TRL_TYPES["preference"][0]
    assert fmt("prompt-completion", pref, completion_field="chosen") == {"prompt": "The sky is", "completion": " blue."}  # fmt: skip


# ---- LLaMA-Factory's preference, ranking and KTO files are refused, naming the method ----


@pytest.mark.parametrize(
    "name, fmt_name, options, match",
    [
        ("kto_en_demo.json", "messages", {}, "record 1: the record's 'label' (true) marks unpaired preference data, for KTO"),
        ("kto_en_demo.json", "sharegpt", {"field": "messages"}, "record 1: the record's 'label' (true) marks unpaired"),
        ("dpo_en_demo.json", "sharegpt", {}, "record 1: the record is preference data ('chosen' and 'rejected'), for DPO or ORPO"),
        ("ranking_alpaca.json", "alpaca", {}, "record 1: field 'output' is a list of 2 answers: LLaMA-Factory's ranking layout"),
    ],
)  # fmt: skip
def test_llama_factory_preference_files_are_refused(name, fmt_name, options, match):
    path = DATA / "llamafactory" / name
    records = json.loads(path.read_text())
    if name == "kto_en_demo.json":  # the desirable record alone is refused too: it is KTO data
        assert records[0]["label"] is True and records[1]["label"] is False
    with pytest.raises(InvalidInputError) as e:
        load_records(path, fmt_name, **options)
    message = str(e.value)
    assert match in message and "\n" not in message and "SFT takes neither" in message


# ---- fields are text where the formatter expects text ----


@pytest.mark.parametrize(
    "name, record, options, match",
    [
        ("alpaca", {"instruction": "Summarise.", "input": {"title": "A", "body": "B"}, "output": "AB"}, {},
         "field 'input' is an object ({'body': 'B', 'title': 'A'}), not text"),
        ("alpaca", {"instruction": "Pick one.", "output": ["only answer"]}, {}, "field 'output' is a list (['only answer']), not text"),
        ("alpaca", {"instruction": "Is it?", "output": True}, {}, "field 'output' is true (a boolean), not text"),
        ("text", {"text": ["line one", "line two"]}, {}, "field 'text' is a list (['line one', 'line two']), not text: give one string"),
        ("text", {"messages": SKY}, {"field": "messages"}, "not text: a list of messages is a chat: use --format messages"),
        ("prompt-completion", {"prompt": "Price?", "completion": 1.5}, {}, "field 'completion' is the number 1.5, not text"),
        ("prompt-completion", {"prompt": SKY, "completion": "It is blue."}, {},
         "field 'completion' is not a list of messages while 'prompt' is one"),
        ("prompt-completion", {"prompt": SKY, "completion": [{"role": "user", "content": "x"}]}, {},
         "field 'completion[0]' is a user message: the whole completion is learned"),
        ("translation", {"source": {"text": "Bonjour"}, "target": "Hello"}, {}, "field 'source' is an object"),
        ("dolly", {"instruction": "Summarise", "context": ["a", "b"], "response": "ab"}, {}, "field 'context' is a list"),
        ("sharegpt", {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "system": ["be kind"]}, {},
         "field 'system' is a list"),
    ],
)  # fmt: skip
def test_fields_that_are_not_text_are_refused(tmp_path, name, record, options, match):
    with pytest.raises(InvalidInputError) as e:
        fmt(name, record, **options)
    assert match in str(e.value)
    good = {"text": "x", "instruction": "i", "output": "o", "prompt": "p", "completion": "c", "source": "s",
            "target": "t", "response": "r", "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}  # fmt: skip
    lines = [good, record] if name != "text" or "field" not in options else [record]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(InvalidInputError) as e:
        load_records(path, name, **options)
    assert str(e.value).startswith(f"{path} line {len(lines)}: ") and match in str(e.value)


def test_whole_numbers_are_their_digits():
    assert (
        fmt("alpaca", {"instruction": "Agent number?", "input": 7, "output": 7}, lang="en")[
            "completion"
        ]
        == "7"
    )
    assert fmt("text", {"text": 2024}) == {"text": "2024"}


# ---- LLaMA-Factory's alpaca system and history: a chat, or refused in the text layouts ----


def test_alpaca_system_and_history_become_a_chat():
    path = DATA / "llamafactory" / "alpaca_history.json"
    with pytest.raises(InvalidInputError) as e:
        load_records(path, "alpaca")
    assert str(e.value) == (
        f"{path} record 2: field 'history' holds 2 earlier turns, which the alpaca text layout "
        "(lang=zh) has no place for: train the records as chats with --format-option lang=chat "
        "(the chat template renders every turn, every answer is learned), or remove the field"
    )
    first, second, third = load_records(path, "alpaca", lang="chat")
    assert first == {"messages": [{"role": "user", "content": "Describe a process of making crepes."},
                                  {"role": "assistant", "content": first["messages"][1]["content"]}]}  # fmt: skip
    assert second["messages"] == [
        {"role": "system", "content": "You are a helpful cooking assistant."},
        {"role": "user", "content": "Describe a process of making crepes."},
        {"role": "assistant", "content": "Whisk flour, eggs and milk into a thin batter and cook thin layers in a hot pan."},
        {"role": "user", "content": "How long should the batter rest?"},
        {"role": "assistant", "content": "About 30 minutes, so the flour absorbs the liquid."},
        {"role": "user", "content": "And what can I fill them with?"},
        {"role": "assistant", "content": "Sweet fillings such as Nutella and banana, or savoury ones such as ham, cheese and egg."},
    ]  # fmt: skip
    # LLaMA-Factory's user turn: the instruction, then the input, on the next line
    assert third["messages"][1] == {"role": "user", "content": "Translate the sentence into French.\nThe weather is nice today."}  # fmt: skip
    with pytest.raises(
        InvalidInputError,
        match="field 'system' holds a system prompt, which the alpaca text layout .lang=en.",
    ):
        fmt("alpaca", {"instruction": "i", "output": "o", "system": "Be kind."}, lang="en")
    # empty system and history are nothing to drop: the text layout takes the record
    assert fmt("alpaca", {"instruction": "i", "output": "o", "system": "", "history": []}) == fmt("alpaca", {"instruction": "i", "output": "o"})  # fmt: skip


@pytest.mark.parametrize(
    "history, match",
    [
        ("not a list", "field 'history' must be a list of [instruction, response] pairs"),
        ([["only the question"]], "field 'history[0]' must be an [instruction, response] pair"),
        ([["q", {"a": 1}]], "field 'history[0][1]' is an object"),
        ([["q", " "]], "field 'history[0]' holds an empty instruction or response"),
    ],
)
def test_bad_history_names_the_turn(history, match):
    with pytest.raises(MissingField, match=re.escape(match)):
        fmt("alpaca", {"instruction": "i", "output": "o", "history": history}, lang="chat")
    assert fmt("alpaca", {"instruction": "i", "output": "o", "history": '[["q", "a"]]'}, lang="chat")["messages"][:2] == [
        {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]  # fmt: skip
