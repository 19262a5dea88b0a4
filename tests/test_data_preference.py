"""adaptr.data.preference: preference formatters (TRL, LLaMA-Factory, UltraFeedback, KTO),
the data kind each method needs, and over-length pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptr import Formatter, hookimpl
from adaptr.data.files import load_records
from adaptr.data.preference import PairRow, apply_max_length, check_kind, tokenize
from adaptr.errors import InvalidInputError
from adaptr.extend.catalog import get_formatter

DATA = Path(__file__).parent / "data"
TRL_TYPES = json.loads((DATA / "trl_dataset_formats.json").read_text())
USER = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "It is blue."}]
GREEN = [{"role": "assistant", "content": "It is green."}]


def fmt(name: str, record: dict, **options) -> dict:
    return get_formatter(name)(record, **options)


def test_trl_preference_types_explicit_and_implicit_prompt():
    explicit = {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}
    assert fmt("preference", TRL_TYPES["preference"][0]) == explicit
    # TRL's extract_prompt: the shared text up to the last whitespace
    assert fmt("preference", TRL_TYPES["implicit-prompt preference"][0]) == {
        "prompt": "The sky is", "chosen": " blue.", "rejected": " green.",
    }  # fmt: skip
    conversational = {"prompt": USER, "chosen": BLUE, "rejected": GREEN}
    assert fmt("preference", TRL_TYPES["conversational preference"][0]) == conversational
    assert (
        fmt("preference", TRL_TYPES["conversational implicit-prompt preference"][0])
        == conversational
    )


def test_ultrafeedback_records_take_the_prompt_off_the_conversations():
    rec = {"prompt": "What color is the sky?", "chosen": USER + BLUE, "rejected": USER + GREEN,
           "score_chosen": 8.0, "score_rejected": 3.0}  # fmt: skip
    assert fmt("preference", rec) == {"prompt": USER, "chosen": BLUE, "rejected": GREEN}
    # answers only (no repeated prompt): the text prompt becomes the user turn
    rec = {"prompt": "What color is the sky?", "chosen": BLUE, "rejected": GREEN}
    assert fmt("preference", rec) == {"prompt": USER, "chosen": BLUE, "rejected": GREEN}


@pytest.mark.parametrize(
    "record, match",
    [
        ({"prompt": "p", "chosen": " a", "rejected": " a"}, "is the same as chosen"),
        ({"prompt": "p", "chosen": " a"}, "field 'rejected' is missing"),
        ({"prompt": "p", "chosen": BLUE, "rejected": " no"}, "must be the same shape as chosen"),
        ({"prompt": "q", "chosen": " a", "rejected": " b", "score_chosen": 2, "score_rejected": 7},
         "is below score_rejected (7): chosen and rejected are swapped"),
        ({"chosen": "alpha", "rejected": "beta"}, "share no opening text"),
        ({"prompt": USER, "chosen": USER + BLUE, "rejected": [{"role": "user", "content": "x"}, *GREEN]},
         "is a user message after the shared prompt"),
    ],
)  # fmt: skip
def test_bad_pairs_are_refused_naming_the_field(record, match):
    with pytest.raises(InvalidInputError, match=match.replace("(", r"\(").replace(")", r"\)")):
        fmt("preference", record)


def test_llama_factory_sharegpt_dpo_file(tmp_path):
    records = load_records(DATA / "llamafactory" / "dpo_en_demo.json", "sharegpt-preference")
    raw = json.loads((DATA / "llamafactory" / "dpo_en_demo.json").read_text())[0]
    assert records[0] == {
        "prompt": [{"role": "user", "content": raw["conversations"][0]["value"]}],
        "chosen": [{"role": "assistant", "content": raw["chosen"]["value"]}],
        "rejected": [{"role": "assistant", "content": raw["rejected"]["value"]}],
    }
    system = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}],
              "chosen": {"from": "gpt", "value": "Hello."}, "rejected": {"from": "gpt", "value": "Go away."}}  # fmt: skip
    out = fmt("sharegpt-preference", system)
    assert [m["role"] for m in out["prompt"]] == ["system", "user"]


def test_llama_factory_alpaca_dpo_and_ranking_layouts():
    rec = {"instruction": "Name a colour.", "input": "sky", "chosen": "Blue.", "rejected": "Green."}
    assert fmt("alpaca-preference", rec) == {
        "prompt": [{"role": "user", "content": "Name a colour.\nsky"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "Green."}],
    }
    text = fmt("alpaca-preference", rec, lang="en")
    assert text["prompt"].endswith("### Input:\nsky\n\n### Response:\n")
    assert (text["chosen"], text["rejected"]) == ("Blue.", "Green.")
    ranking = load_records(DATA / "llamafactory" / "ranking_alpaca.json", "alpaca-preference")
    raw = json.loads((DATA / "llamafactory" / "ranking_alpaca.json").read_text())[0]
    assert [ranking[0]["chosen"][0]["content"], ranking[0]["rejected"][0]["content"]] == raw[
        "output"
    ]


def test_kto_records_trl_and_llama_factory():
    assert fmt("kto", TRL_TYPES["unpaired preference"][0]) == TRL_TYPES["unpaired preference"][0]
    conv = TRL_TYPES["conversational unpaired preference"][0]
    assert fmt("kto", conv) == conv
    records = load_records(DATA / "llamafactory" / "kto_en_demo.json", "kto")
    assert [r["label"] for r in records] == [True, False]
    assert (
        records[0]["prompt"][-1]["role"] == "user"
        and records[0]["completion"][0]["role"] == "assistant"
    )
    assert fmt("kto", {"prompt": "p", "completion": "c", "kto_tag": "false"}, label_field="kto_tag")["label"] is False  # fmt: skip
    with pytest.raises(InvalidInputError, match="field 'label' must be true .desirable. or false"):
        fmt("kto", {"prompt": "p", "completion": "c", "label": "maybe"})
    with pytest.raises(InvalidInputError, match="field 'label' is missing"):
        fmt("kto", {"prompt": "p", "completion": "c"})


def test_each_method_takes_its_kind_of_data():
    check_kind("dpo", "preference", "preference")
    check_kind("kto", "unpaired-preference", "kto")
    check_kind("kto", "preference", "preference")  # TRL's KTOTrainer unpairs them
    with pytest.raises(
        InvalidInputError, match="--method dpo needs preference pairs: prompt, chosen and rejected"
    ):
        check_kind("dpo", "prompt-completion", "alpaca")
    with pytest.raises(InvalidInputError, match="--method orpo needs preference pairs"):
        check_kind("orpo", "unpaired-preference", "kto")
    with pytest.raises(
        InvalidInputError, match="--method kto needs prompt, completion and a true/false label"
    ):
        check_kind("kto", "messages", "messages")
    with pytest.raises(InvalidInputError, match="SFT cannot learn from: train with --method dpo"):
        check_kind("sft", "preference", "preference")


def test_a_plugin_registers_a_preference_formatter(tmp_path, register_plugin):
    class Plugin:
        @hookimpl
        def adaptr_register_formatters(self, register):
            register(Formatter("votes", lambda r: {"prompt": r["q"], "chosen": r["up"], "rejected": r["down"]},
                               kind="preference", fields=["q", "up", "down"]))  # fmt: skip

    register_plugin(Plugin(), "votes-plugin")
    path = tmp_path / "votes.jsonl"
    path.write_text(json.dumps({"q": "2+2=", "up": "4", "down": "5"}) + "\n")
    assert load_records(path, "votes") == [{"prompt": "2+2=", "chosen": "4", "rejected": "5"}]
    assert get_formatter("votes").kind == "preference"


def rows() -> list[PairRow]:
    return [
        PairRow(1, [1] * 4, [[2] * 3, [3] * 2]),  # 7 tokens
        PairRow(2, [1] * 10, [[2] * 5, [3] * 6]),  # 16, prompt 10
        PairRow(3, [1] * 3, [[2] * 9, [3] * 1]),  # 12
    ]


def test_over_length_pairs_truncate_drop_refuse():
    keep, report = apply_max_length(rows(), 10, "truncate")
    # the prompt of record 2 fills max_length: TRL would drop it (no answer token left)
    assert keep == [1, 3] and report.over_length == [2, 3] and report.emptied == [2]
    assert report.longest == 16 and report.kept == 2 and report.tokens == 7 + 10
    assert report.loss_tokens == 5 + (7 + 1)  # record 3's answers are cut to 10 - 3 = 7 tokens
    assert "2 of 3 records exceed max_length=10 tokens" in report.lines()[0]
    keep, report = apply_max_length(rows(), 10, "truncate", truncation_mode="keep_end")
    assert keep == [1, 2, 3] and report.emptied == []
    keep, report = apply_max_length(rows(), 10, "drop")
    assert keep == [1] and report.dropped == [2, 3]
    with pytest.raises(
        InvalidInputError, match="2 of 3 records exceed max_length=10 tokens .* raise --max-length"
    ):
        apply_max_length(rows(), 10, "refuse")
    assert apply_max_length(rows(), None, "refuse")[0] == [1, 2, 3]


def test_tokenize_counts_as_trl_prepares(tiny_llama):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    records = [{"prompt": "The sky is", "chosen": " blue.", "rejected": " a bright green."}]
    ds = Dataset.from_list([{**r, "adaptr_record": 1} for r in records])
    (row,) = tokenize(ds, tok, "preference")
    from types import SimpleNamespace

    args = DPOConfig(output_dir="/tmp/unused", use_cpu=True, max_length=None, report_to="none")
    trl = DPOTrainer._prepare_dataset(
        SimpleNamespace(_tokenizer=tok), Dataset.from_list(records), tok, args, "t"
    )[0]
    assert row.prompt_ids == trl["prompt_ids"] and row.answers == [
        trl["chosen_ids"],
        trl["rejected_ids"],
    ]
    assert row.answers[0][-1] == tok.eos_token_id  # TRL adds EOS to text answers
