"""training.preview: --preview shows the records as the model will see them; no weights, nothing stored."""

from __future__ import annotations

import json

import pytest

from adaptr.training.preview import preview

from helpers import alpaca_file, recipe


def test_preview_cli_shows_examples_counts_and_cuts(
    cli, registry, tiny_llama, tmp_path, monkeypatch
):
    import adaptr.training.steps

    monkeypatch.setattr(adaptr.training.steps, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    data = alpaca_file(tmp_path / "d.jsonl", long_every=4)
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                         "--format-option", "lang=en", "--name", "p", "--max-length", "200",
                         "--preview", "2")  # fmt: skip
    assert code == 0, err
    assert "text between ⟦ and ⟧ carries loss" in out
    assert "── record 1 (train):" in out and "DROPPED" in out and "── record 2 (train):" in out
    assert "### Instruction:\nSay 1.\n\n### Response:\n⟦1 it is.<|endoftext|>⟧" in out
    assert "✂ max_length cuts" in out and "train: 6 of 8 records train" in out
    assert "loss on: the completion only" in out
    assert "2 of 8 records exceed max_length=200" in err
    assert registry.list() == [] and not (registry.home / "runs").exists()


def test_preview_says_when_training_would_stop(tiny_llama, registry, tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl", long_every=1, n=2)
    p = preview(recipe("x", tiny_llama, data, max_length=64), registry=registry)
    assert p.notes[-1] == "all 2 train records would be dropped: training would stop"


def test_preview_json_and_refuse_policy_reports_instead_of_stopping(cli, tiny_llama, tmp_path):
    data = alpaca_file(tmp_path / "d.jsonl", long_every=4)
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
                         "--name", "p", "--max-length", "64", "--over-length", "refuse",
                         "--preview", "--json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert len(doc["examples"]) == 3 and doc["splits"][0]["over_length"] == 2
    assert "training refuses them (data.over_length: refuse)" in doc["notes"][0]
    ex = doc["examples"][1]
    assert ex["record"] == 2 and ex["loss_tokens"] > 0 and ex["cut_tokens"] == 0
    assert "".join(s["text"] for s in ex["segments"] if s["loss"]) == "1 it is.<|endoftext|>"


def test_json_without_preview_is_a_usage_error(cli, tiny_llama):
    code, _, err = cli("train", "--base", str(tiny_llama), "--json")
    assert code == 2 and "--json goes with --preview" in err
