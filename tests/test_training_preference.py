"""adaptr train --method dpo|orpo|kto: TRL's math, lineage, learning, refusals, resume, Ctrl-C."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
from pathlib import Path

import pytest

from adaptr.registry import Registry
from adaptr.training.trainer import TrainingInterrupted, train

from helpers import refused, snapshot

PAIRS = [("Q: 2+2?\nA:", " 4", " 5"), ("Color of sky:", " blue", " green"), ("Say hi:", " hello", " go away"),
         ("Capital of France:", " Paris", " Rome"), ("Count:", " 1 2 3", " 3 2 1"), ("Opposite of up:", " down", " left"),
         ("Colour of grass:", " green", " red"), ("Q: 3+3?\nA:", " 6", " 7")]  # fmt: skip
FAST = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "logging_steps": 1,
        "gradient_checkpointing": False, "seed": 42}  # fmt: skip
CLI_FAST = ["--max-steps", "2", "--batch-size", "4", "--lr", "1e-2", "--no-gradient-checkpointing"]
TOLERANCE = 1e-5  # absolute, on the first step's loss: the same trainer on the same batch


def pair_file(path: Path, pairs=PAIRS) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in pairs)
    )
    return path


def kto_file(path: Path) -> Path:
    rows = [
        {"prompt": p, "completion": c if i % 2 else r, "label": bool(i % 2)}
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def recipe(method: str, base: Path, data: Path, fmt: str = "preference", **extra) -> dict:
    return {"name": f"{method}-run", "method": method, "base": {"path": str(base)},
            "data": {"path": str(data), "format": fmt}, "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
            method: {**FAST, **extra}}  # fmt: skip


def plain_trl(method: str, base: Path, records: list[dict], peft_config, out: Path) -> list[dict]:
    """The same run with TRL alone: its log history."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptr.training.preference import config_class, trainer_class

    model = AutoModelForCausalLM.from_pretrained(base)
    args = config_class(method)(
        output_dir=str(out), use_cpu=True, report_to="none", disable_tqdm=True, **FAST
    )
    tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:  # ORPO's collator needs one; TRL's docs: use EOS
        tokenizer.pad_token = tokenizer.eos_token
    trainer = trainer_class(method)(
        model=model, args=args, train_dataset=Dataset.from_list(records),
        processing_class=tokenizer, peft_config=peft_config,
    )  # fmt: skip
    trainer.train()
    return trainer.state.log_history


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_first_step_loss_equals_plain_trl(method, registry, tiny_llama, tmp_path):
    from peft import LoraConfig

    data = kto_file(tmp_path / "k.jsonl") if method == "kto" else pair_file(tmp_path / "p.jsonl")
    fmt = "kto" if method == "kto" else "preference"
    r = train(recipe(method, tiny_llama, data, fmt), registry=registry, progress=False)
    ours = r.version.lineage["log_history"]
    stored = registry.export(r.version.ref, tmp_path / "exported")
    config = LoraConfig.from_pretrained(str(stored))  # the LoRA settings adaptr trained with
    config.inference_mode = False
    records = [json.loads(line) for line in data.read_text().splitlines()]
    theirs = plain_trl(method, tiny_llama, records, config, tmp_path / "trl")
    assert math.isfinite(ours[0]["loss"])
    assert abs(ours[0]["loss"] - theirs[0]["loss"]) <= TOLERANCE, (ours[0], theirs[0])
    # at step 1 a fresh LoRA is the reference, so DPO's loss is ln 2 and KTO's 0.5 whatever the
    # data: the answers' log-probabilities are what say both saw the same tokens
    logps = [k for k in ours[0] if k.startswith("logps/") and k in theirs[0]]
    assert logps, sorted(ours[0])
    for key in logps:
        assert abs(ours[0][key] - theirs[0][key]) <= 1e-4 * max(1.0, abs(theirs[0][key])), key
    assert r.version.lineage["method"] == method and r.metrics["steps"] == 2


def test_cli_dpo_continues_an_sft_version_with_its_lineage(cli, registry, tiny_llama, tmp_path):
    data = pair_file(tmp_path / "pairs.jsonl")
    base = [
        "train",
        "--base",
        str(tiny_llama),
        "--data",
        str(data),
        "--name",
        "chat",
        "--r",
        "2",
        *CLI_FAST,
    ]
    code, out, err = cli(
        *base, "--format", "prompt-completion", "--format-option", "completion_field=chosen"
    )
    assert code == 0 and out.startswith("chat@1"), err[-2000:]
    code, out, err = cli(*base, "--method", "dpo", "--format", "preference", "--from", "chat@1",
                         "--eval-split", "0.25", "--set", "dpo.beta=0.2", "--set", "dpo.loss_type=[ipo]",
                         "--set", "dpo.logging_steps=1")  # fmt: skip
    assert code == 0, err[-2000:]
    assert (
        out.startswith("chat@2  (train loss ") and "reward accuracy" in out and "eval loss" in out
    )
    v = registry.get("chat@2")
    pref = v.lineage["preference"]
    assert v.lineage["method"] == "dpo" and v.lineage["parents"] == ["chat@1"]
    assert pref["parent"] == "chat@1" and pref["reference"] == "chat@1"  # the SFT version, frozen
    first = next(h for h in v.lineage["log_history"] if "rewards/chosen" in h)
    assert first["step"] == 1  # the policy starts as chat@1: against chat@1 its rewards are 0
    assert abs(first["rewards/chosen"]) <= 1e-6 and abs(first["rewards/rejected"]) <= 1e-6, first
    assert pref["beta"] == 0.2 and pref["loss_type"] == ["ipo"]
    assert pref["data"]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert (
        pref["data"]["pairs"] == 8
        and pref["data"]["train_records"] == 6
        and pref["data"]["eval_records"] == 2
    )
    assert set(pref["final"]) == {
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
    }
    last = [h for h in v.lineage["log_history"] if "rewards/margins" in h][-1]  # the last step's
    assert pref["final"]["rewards/margins"] == last["rewards/margins"]
    assert v.lineage["recipe"]["method"] == "dpo" and v.lineage["recipe"]["dpo"]["beta"] == 0.2
    assert (
        v.metrics["reward_accuracy"] == pref["final"]["rewards/accuracies"]
        and "eval_reward_margin" in v.metrics
    )
    files = {f.path for f in v.files}
    assert "adapter_model.safetensors" in files and not any(
        f.startswith("ref/") for f in files
    )  # no reference copy


def test_dpo_learns_a_learnable_preference(registry, tiny_llama, tmp_path):
    pairs = [(f"Item {i}. Answer:", " yes", " no") for i in range(24)]
    data = pair_file(tmp_path / "yes.jsonl", pairs)
    rec = recipe("dpo", tiny_llama, data, max_steps=12, learning_rate=5e-2, beta=0.5)
    rec["data"]["eval_split"] = 0.25
    r = train(rec, registry=registry, progress=False)
    logs = [h for h in r.version.lineage["log_history"] if "rewards/accuracies" in h]
    assert logs[0]["rewards/accuracies"] == 0.0  # the first step: the policy is the reference
    assert (
        r.metrics["reward_accuracy"] == 1.0
        and logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    )
    assert r.metrics["eval_reward_accuracy"] >= 0.8 and r.metrics["eval_reward_margin"] > 0


def test_kto_takes_pairs_unpaired_as_trl_does(registry, tiny_llama, tmp_path):
    r = train(
        recipe("kto", tiny_llama, pair_file(tmp_path / "p.jsonl")),
        registry=registry,
        progress=False,
    )
    pref = r.version.lineage["preference"]
    assert pref["reference"].endswith("(adapter disabled)") and pref["loss_type"] == "kto"
    assert pref["data"]["pairs"] == 8 and math.isfinite(r.metrics["train_loss"])


def test_wrong_data_or_settings_are_refused_in_one_line(cli, home, tiny_llama, tmp_path):
    pairs, kto = pair_file(tmp_path / "p.jsonl"), kto_file(tmp_path / "k.jsonl")
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    base = ["train", "--base", str(tiny_llama), "--name", "x", *CLI_FAST]
    before = snapshot(home)
    refused(cli, home, before, *base, "--method", "dpo", "--data", str(alpaca), "--format", "alpaca",
            match="--method dpo needs preference pairs: prompt, chosen and rejected")  # fmt: skip
    refused(cli, home, before, *base, "--method", "orpo", "--data", str(kto), "--format", "kto",
            match="--method orpo needs preference pairs")  # fmt: skip
    refused(cli, home, before, *base, "--data", str(pairs), "--format", "preference",
            match="SFT cannot learn from: train with --method dpo")  # fmt: skip
    refused(cli, home, before, *base, "--method", "dpo", "--data", str(pairs), "--format", "preference",
            "--set", "dpo.betta=0.2", match="unknown recipe key dpo.betta (not a DPOConfig field you can set); did you mean 'beta'?")  # fmt: skip
    refused(cli, home, before, *base, "--method", "kto", "--data", str(kto), "--format", "kto",
            "--set", "sft.beta=0.2", match="the sft section (beta) is for method sft; this recipe trains with kto")  # fmt: skip
    refused(cli, home, before, *base, "--method", "dpo", "--data", str(pairs), "--format", "preference",
            "--max-length", "4", "--over-length", "refuse", match="records exceed max_length=4 tokens")  # fmt: skip
    refused(cli, home, before, *base, "--method", "dpo", "--data", str(pairs), "--format", "preference",
            "--set", "dpo.loss_type=[nonsense]", match="dpo.loss_type 'nonsense' is not one of TRL's: sigmoid, hinge, ipo")  # fmt: skip


def test_over_length_pairs_are_reported_and_dropped(registry, tiny_llama, tmp_path):
    notes: list[str] = []
    rec = recipe("dpo", tiny_llama, pair_file(tmp_path / "p.jsonl"), max_length=20)
    rec["data"]["over_length"] = "drop"
    r = train(rec, registry=registry, progress=False, on_note=notes.append)
    lengths = r.version.lineage["dataset"]["lengths"]["train"]
    assert lengths["over_length"] > 0 and lengths["dropped"] == lengths["over_length"]
    assert r.version.lineage["preference"]["data"]["train_records"] == 8 - lengths["dropped"]
    assert any(
        "exceed max_length=20 tokens" in n and "dropped (data.over_length: drop)" in n
        for n in notes
    )


def test_preview_shows_chosen_and_rejected(cli, tiny_llama, tmp_path):
    args = ["train", "--base", str(tiny_llama), "--data", str(pair_file(tmp_path / "p.jsonl")), "--format",
            "preference", "--name", "x", "--method", "dpo", "--preview", "2"]  # fmt: skip
    code, out, err = cli(*args)
    assert code == 0, err
    assert "dpo: loss on the answers' tokens (chosen and rejected)" in out
    assert "chosen" in out and "rejected" in out and " blue" in out and " green" in out
    code, out, err = cli(*args, "--json")
    doc = json.loads(out)
    assert doc["method"] == "dpo" and len(doc["examples"]) == 2
    first = doc["examples"][0]
    assert first["prompt"].endswith("Q: 2+2?\nA:") and first["answers"]["chosen"].startswith(" 4")
    assert first["answers"]["rejected"].startswith(" 5") and doc["splits"][0]["records"] == 8


def test_resume_continues_a_dpo_run(cli, home, tiny_llama, tmp_path):
    args = ["train", "--base", str(tiny_llama), "--data", str(pair_file(tmp_path / "p.jsonl")), "--format",
            "preference", "--name", "r", "--method", "dpo", "--batch-size", "2", "--no-gradient-checkpointing",
            "--set", "dpo.save_steps=1"]  # fmt: skip
    code, out, err = cli(*args, "--max-steps", "2", "--keep-run")
    assert code == 0, err[-2000:]
    code, out, err = cli(*args, "--max-steps", "3", "--resume")
    assert code == 0 and out.startswith("r@2"), err[-2000:]
    v = Registry(home).get("r@2")
    assert v.lineage["resumed_from"].endswith("checkpoint-2") and v.metrics["steps"] == 3


def test_ctrl_c_stops_a_dpo_run_and_stores_nothing(registry, tiny_llama, tmp_path, monkeypatch):
    from adaptr.training.callbacks import StopOnInterrupt

    original = StopOnInterrupt.on_step_end

    def interrupted(self, args, state, control, **kwargs):
        if state.global_step == 1:
            os.kill(
                os.getpid(), signal.SIGINT
            )  # a real SIGINT through the handler training installs
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnInterrupt, "on_step_end", interrupted)
    rec = recipe(
        "dpo",
        tiny_llama,
        pair_file(tmp_path / "p.jsonl"),
        max_steps=4,
        per_device_train_batch_size=2,
    )
    before = snapshot(registry.home)
    with pytest.raises(TrainingInterrupted, match="training of dpo-run interrupted at step 1;"):
        train(rec, registry=registry, progress=False)
    assert snapshot(registry.home) == before


def test_qlora_dpo_trains_on_cpu(registry, tmp_path):
    from adaptr.tiny import save_tiny_base

    base = save_tiny_base(tmp_path / "base64", "llama", hidden_size=64, intermediate_size=128)
    rec = recipe("dpo", base, pair_file(tmp_path / "p.jsonl"))
    rec["base"]["quantization"] = "4bit"
    r = train(rec, registry=registry, progress=False)
    assert (
        math.isfinite(r.metrics["train_loss"])
        and r.version.lineage["recipe"]["base"]["quantization"] == "4bit"
    )
    assert r.version.lineage["preference"]["reference"].endswith("(adapter disabled)")


def test_kto_trains_on_unequal_desirable_and_undesirable_counts(registry, tiny_llama, tmp_path):
    """Real KTO data is rarely balanced (LLaMA-Factory's demo, any eval split): 5 thumbs up,
    3 down trains, and the counts are recorded."""
    rows = [
        {"prompt": p, "completion": c if i < 5 else r, "label": i < 5}
        for i, (p, c, r) in enumerate(PAIRS)
    ]
    data = tmp_path / "unequal.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = train(recipe("kto", tiny_llama, data, "kto"), registry=registry, progress=False)
    counts = r.version.lineage["preference"]["data"]
    assert math.isfinite(r.metrics["train_loss"]) and r.metrics["steps"] == 2
    assert (counts.get("desirable"), counts.get("undesirable")) == (5, 3), counts
