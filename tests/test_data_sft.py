"""data.sft: what trains is what the user meant: over-length records, loss masks, chat and tool
calls, preference data refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptr.errors import InvalidInputError
from adaptr.training.preview import preview
from adaptr.training.trainer import train

from helpers import FAST, LONG, alpaca_file, recipe, refused, snapshot


@pytest.fixture(scope="module")
def marked_qwen(tmp_path_factory) -> Path:
    """A tiny Qwen2 base whose tokenizer carries ChatML with {% generation %} markers."""
    from transformers import AutoTokenizer

    from adaptr.plugins.common import CHATML
    from adaptr.tiny import save_tiny_base

    path = save_tiny_base(tmp_path_factory.mktemp("bases") / "qwen-marked", "qwen2")
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHATML
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_qwen(tmp_path_factory) -> Path:
    """A tiny Qwen2 base whose tokenizer's own ChatML template has no generation markers
    (as Qwen2.5's does not)."""
    from adaptr.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("bases") / "qwen-plain", "qwen2")


def chat_file(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                      {"role": "assistant", "content": "6"}]},
        {"messages": [{"role": "user", "content": "A color?"}, {"role": "assistant", "content": "Blue."}]},
        {"messages": [{"role": "user", "content": "Long? " + LONG}, {"role": "assistant", "content": "Yes."}]},
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


# ---- over-length records: counted, reported before training, the user's choice ----


def test_truncation_is_reported_before_training_and_recorded(cli, registry, tiny_llama, tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl", long_every=4)
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                         "--name", "t", "--max-length", "64", "--max-steps", "1", "--batch-size", "8",
                         "--no-gradient-checkpointing")  # fmt: skip
    assert code == 0, err
    line = "note: 2 of 8 records exceed max_length=64 tokens (longest "
    assert line in err and "records 1, 5): truncating" in err
    # their prompt alone fills max_length: truncation leaves them no completion token
    assert "2 of them keep no token that carries loss and are dropped (records 1, 5)" in err
    assert err.index(line) < err.index("trainable params")  # said before training starts
    dataset = registry.get("t").lineage["dataset"]
    assert dataset["records"] == 8 and dataset["train_records"] == 6
    lengths = dataset["lengths"]["train"]
    assert lengths["over_length"] == 2 and lengths["dropped"] == 2 and lengths["kept"] == 6
    assert lengths["policy"] == "truncate" and lengths["max_length"] == 64


def test_drop_policy_leaves_long_records_out(registry, tiny_llama, tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl", long_every=4)
    heard = []
    result = train(recipe("d", tiny_llama, data, data_extra={"over_length": "drop"}, max_length=64),
                   registry=registry, progress=False, on_note=heard.append)  # fmt: skip
    assert any(
        "2 of 8 records exceed max_length=64" in n
        and n.endswith("dropped (data.over_length: drop)")
        for n in heard
    )
    assert result.notes[: len(heard)] == heard
    assert result.version.lineage["dataset"]["train_records"] == 6
    assert result.version.lineage["recipe"]["data"]["over_length"] == "drop"


def test_refuse_policy_stops_before_the_model_loads(
    cli, registry, tiny_llama, tmp_path, monkeypatch
):
    import adaptr.training.steps

    data = alpaca_file(tmp_path / "d.jsonl", long_every=4)

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(adaptr.training.steps, "load_model", no_model)
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                         "--name", "r", "--max-length", "64", "--over-length", "refuse")  # fmt: skip
    assert code != 0 and out == ""
    assert (
        err.startswith("error: 2 of 8 records exceed max_length=64 tokens") and err.count("\n") == 1
    )
    assert "raise --max-length, or set data.over_length to truncate or drop" in err
    assert registry.list() == [] and not (registry.home / "runs" / "r").exists()


def test_every_record_dropped_is_one_line_error(cli, registry, tiny_llama, tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl", long_every=1, n=3)
    with pytest.raises(
        InvalidInputError, match=r"^all 3 training records were dropped: 3 of 3 records exceed"
    ):
        train(recipe("x", tiny_llama, data, max_length=64), registry=registry, progress=False)
    code, _, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                       "--name", "x", "--max-length", "64")  # fmt: skip
    assert code != 0 and err.startswith("error: all 3 training records were dropped")
    assert "internal error" not in err and err.count("\n") == 1 and registry.list() == []


def test_over_length_setting_is_checked(cli, tiny_llama, tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl")
    code, _, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                       "--name", "x", "--set", "data.over_length=cut")  # fmt: skip
    assert code != 0 and "data.over_length must be one of truncate, drop, refuse, got 'cut'" in err


def test_adaptr_tokenization_trains_exactly_as_trl_alone(registry, marked_qwen, tmp_path):
    """Same first-step loss as TRL's own SFTTrainer on the raw records (LoRA B starts at 0, so
    it is the base's loss on the tokens that carry loss): truncation, drops and assistant masks
    are TRL's, only counted and reported."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    data = chat_file(tmp_path / "chat.jsonl")
    sft = {**FAST, "max_length": 64, "learning_rate": 1e-9}
    ours = train(
        recipe("same", marked_qwen, data, "messages", **sft), registry=registry, progress=False
    )
    assert (
        ours.version.lineage["recipe"]["sft"]["assistant_only_loss"] is True
    )  # the default for chat

    records = [json.loads(line) for line in data.read_text().splitlines()]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                     assistant_only_loss=True, disable_tqdm=True, **sft)  # fmt: skip
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(marked_qwen), args=args,
        train_dataset=Dataset.from_list(records), processing_class=AutoTokenizer.from_pretrained(marked_qwen),
        peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )  # fmt: skip
    theirs = trainer.train().training_loss
    assert ours.metrics["train_loss"] == pytest.approx(theirs, abs=1e-4)  # fp32, same tokens


# ---- loss masks: assistant turns by default, found even without generation markers ----


def loss_text(p, record: int) -> str:
    ex = next(e for e in p.examples if e.record == record)
    return "|".join(s.text for s in ex.segments if s.loss)


@pytest.mark.parametrize("base", ["marked_qwen", "plain_qwen"])
def test_chat_loss_is_on_assistant_turns_only(request, registry, base, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    p = preview(
        recipe("c", request.getfixturevalue(base), data, "messages"), registry=registry, count=2
    )
    assert p.loss.startswith("assistant turns only")
    # the generation markers end at <|im_end|>; rendering turn by turn also takes its newline
    end = "<|im_end|>" if base == "marked_qwen" else "<|im_end|>\n"
    assert loss_text(p, 1) == f"4{end}|6{end}" and loss_text(p, 2) == f"Blue.{end}"
    context = "".join(s.text for s in p.examples[0].segments if not s.loss)
    assert "Be brief." in context and "2+2?" in context and "And 3+3?" in context


def test_loss_on_every_token_is_a_recipe_switch(cli, registry, plain_qwen, tmp_path):
    data = chat_file(tmp_path / "chat.jsonl")
    r = recipe("all", plain_qwen, data, "messages", assistant_only_loss=False)
    p = preview(r, registry=registry, count=1)
    assert p.loss == "every token" and all(s.loss for s in p.examples[0].segments)
    code, _, err = cli("train", "--base", str(plain_qwen), "--data", str(data), "--format", "messages",
                       "--name", "all", "--max-steps", "1", "--no-gradient-checkpointing",
                       "--set", "sft.assistant_only_loss=false")  # fmt: skip
    assert code == 0, err
    assert registry.get("all").lineage["recipe"]["sft"]["assistant_only_loss"] is False


def test_assistant_only_loss_on_plain_text_is_refused(cli, tiny_llama):
    data = Path(__file__).parent.parent / "examples" / "data" / "quotes.jsonl"
    code, _, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "text",
                       "--format-option", "field=quote", "--name", "q",
                       "--set", "sft.assistant_only_loss=true")  # fmt: skip
    assert code != 0 and err.startswith("error: sft.assistant_only_loss needs chat data")


# ---- --preview: as the model will see it, no weights, nothing stored ----


# ---- cheap checks run before torch is imported ----


TOOLS = {
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
}  # fmt: skip


def test_tool_calls_train_through_a_template_that_renders_them(cli, registry, plain_qwen, tmp_path):
    from adaptr.plugins.common import CHATML

    data = tmp_path / "tools.jsonl"
    data.write_text(json.dumps(TOOLS) + "\n" + json.dumps(TOOLS) + "\n")
    # the tokenizer's own template ignores tools: refused, saying how to give another
    code, _, err = cli("train", "--base", str(plain_qwen), "--data", str(data), "--format", "messages",
                       "--name", "t", "--preview")  # fmt: skip
    assert code != 0 and err.count("\n") == 1
    assert "ignores the 'tools' list" in err and "sft.chat_template_path=FILE.jinja" in err
    template = tmp_path / "chatml.jinja"
    template.write_text(CHATML)
    r = recipe("t", plain_qwen, data, "messages", chat_template_path=str(template))
    p = preview(r, registry=registry, count=1)
    context = "".join(s.text for s in p.examples[0].segments if not s.loss)
    assert '"name": "get_weather"' in context and "18C, sunny" in context  # tools and results seen
    assert loss_text(p, 1) == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
        "|It is 18C and sunny.<|im_end|>"
    )
    r["sft"]["chat_template_path"] = str(tmp_path / "template.txt")
    with pytest.raises(InvalidInputError, match="is not a .jinja file"):
        preview(r, registry=registry)


# ---- TRL's conversational prompt-completion: the chat template renders it, loss on the completion ----

DATA = Path(__file__).parent / "data"
SKY = [{"role": "user", "content": "What color is the sky?"}]
CONVERSATIONAL_PC = [
    {"prompt": SKY, "completion": [{"role": "assistant", "content": "It is blue."}]},  # TRL's doc
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "completion": [{"role": "assistant", "content": "4"}]},
]  # fmt: skip


def test_conversational_prompt_completion_renders_with_the_chat_template(
    cli, home, tiny_llama, tmp_path
):
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL_PC))
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "prompt-completion",
                         "--name", "pc", "--preview", "2")  # fmt: skip
    assert code == 0, err
    assert "{'role'" not in out and "'content'" not in out  # not the Python repr of the lists
    assert (
        "<|im_start|>user\nWhat color is the sky?<|im_end|>\n<|im_start|>assistant\n⟦It is blue.<|im_end|>\n⟧"
        in out
    )
    assert "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n" in out
    assert "loss on: the completion only" in out
    # the template must render all of it, as for chat data: here it drops a speaker's name
    named = tmp_path / "named.jsonl"
    named.write_text(json.dumps({"prompt": [{"role": "user", "name": "alice", "content": "Hi!"}],
                                 "completion": [{"role": "assistant", "content": "Hi, Alice."}]}) + "\n")  # fmt: skip
    refused(cli, home, None, "train", "--base", str(tiny_llama), "--data", str(named), "--format", "prompt-completion",
            "--name", "pc", "--preview", match="record 1: the chat template ignores the name 'alice' of message 1 (user)")  # fmt: skip


def test_conversational_prompt_completion_trains_exactly_as_trl_alone(
    registry, marked_qwen, tmp_path
):
    """Same tokens, labels and first-step loss as TRL's SFTTrainer on the raw records."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from adaptr.data.sft import DataSettings, load_splits, tokenize

    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONAL_PC))
    sft = {**FAST, "learning_rate": 1e-9}
    ours = train(
        recipe("pc", marked_qwen, data, "prompt-completion", **sft),
        registry=registry,
        progress=False,
    )
    assert ours.version.lineage["recipe"]["sft"]["completion_only_loss"] is True
    args = SFTConfig(output_dir=str(tmp_path / "trl"), report_to="none", use_cpu=True, bf16=False,
                     disable_tqdm=True, **sft)  # fmt: skip
    tok = AutoTokenizer.from_pretrained(marked_qwen)
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(marked_qwen), args=args,
        train_dataset=Dataset.from_list(CONVERSATIONAL_PC), processing_class=tok,
        peft_config=LoraConfig(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )  # fmt: skip
    splits = load_splits(DataSettings(path=str(data), format="prompt-completion"), 0)
    mine = tokenize(splits.train, tok, args)
    assert mine["input_ids"] == trainer.train_dataset["input_ids"]
    assert mine["labels"] == trainer.train_dataset["labels"]
    assert [tok.decode([t for t in row if t != -100]) for row in mine["labels"]] == [
        "It is blue.<|im_end|>\n",
        "4<|im_end|>\n",
    ]
    assert ours.metrics["train_loss"] == pytest.approx(trainer.train().training_loss, abs=1e-4)


# ---- LLaMA-Factory's alpaca system and history train as a chat; preference data is refused ----


def test_alpaca_history_trains_as_a_chat_with_every_answer_learned(cli, home, tiny_llama):
    data = DATA / "llamafactory" / "alpaca_history.json"
    refused(cli, home, None, "train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
            "--name", "h", "--preview", match="record 2: field 'history' holds 2 earlier turns, which the alpaca "
            "text layout (lang=zh) has no place for: train the records as chats with --format-option lang=chat")  # fmt: skip
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                         "--format-option", "lang=chat", "--name", "h", "--preview", "3", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["loss"].startswith("assistant turns only")
    second = doc["examples"][1]
    context = "".join(s["text"] for s in second["segments"] if not s["loss"])
    learned = [s["text"] for s in second["segments"] if s["loss"]]
    assert "<|im_start|>system\nYou are a helpful cooking assistant.<|im_end|>" in context
    assert (
        "How long should the batter rest?" in context
        and "And what can I fill them with?" in context
    )
    assert learned == [  # LLaMA-Factory's default (mask_history: false): every answer
        "Whisk flour, eggs and milk into a thin batter and cook thin layers in a hot pan.<|im_end|>\n",
        "About 30 minutes, so the flour absorbs the liquid.<|im_end|>\n",
        "Sweet fillings such as Nutella and banana, or savoury ones such as ham, cheese and egg.<|im_end|>\n",
    ]


@pytest.mark.parametrize(
    "name, fmt, match",
    [
        ("kto_en_demo.json", "messages", "record 1: the record's 'label' (true) marks unpaired preference data, for KTO (TRL's KTOTrainer)"),
        ("dpo_en_demo.json", "sharegpt", "record 1: the record is preference data ('chosen' and 'rejected'), for DPO or ORPO (TRL's DPOTrainer)"),
    ],
)  # fmt: skip
def test_preference_data_is_refused_before_anything_trains(
    cli, home, registry, tiny_llama, name, fmt, match
):
    before = snapshot(home)
    line = refused(cli, home, before, "train", "--base", str(tiny_llama), "--data", str(DATA / "llamafactory" / name),
                   "--format", fmt, "--name", "pref", "--max-steps", "1", match=match)  # fmt: skip
    assert "SFT takes neither preference nor unpaired-preference data (train it with --method dpo" in line
    assert registry.list() == []
