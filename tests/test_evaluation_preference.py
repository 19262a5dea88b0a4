"""adaptr eval --metrics pref: preference accuracy and margin of many versions in one mixed
pass, equal to each version scored alone through PEFT, stored and usable in tag gates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptr.evaluation.run import evaluate
from adaptr.training.trainer import train

from helpers import refused, snapshot

TOLERANCE = 1e-4  # absolute, nats: mixed batches vs one version alone (float32 sums of ~10 tokens)
PAIRS = [(f"Item {i}. Answer:", " yes", " nah") for i in range(16)]  # answers of one length


def pair_file(path: Path) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in PAIRS)
    )
    return path


@pytest.fixture
def versions(registry, tiny_llama, tmp_path):
    """m@1 (SFT on the chosen answers), m@2 (DPO from m@1 on the same pairs)."""
    data = pair_file(tmp_path / "yes.jsonl")
    fast = {
        "per_device_train_batch_size": 4,
        "gradient_checkpointing": False,
        "learning_rate": 5e-2,
    }
    base = {
        "name": "m",
        "base": {"path": str(tiny_llama)},
        "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
    }
    train({**base, "data": {"path": str(data), "format": "prompt-completion", "options": {"completion_field": "chosen"}},
           "sft": {**fast, "max_steps": 1}}, registry=registry, progress=False)  # fmt: skip
    train({**base, "from": "m@1", "method": "dpo", "data": {"path": str(data), "format": "preference"},
           "dpo": {**fast, "max_steps": 10, "beta": 0.5}}, registry=registry, progress=False)  # fmt: skip
    return data


def alone(registry, ref: str | None, base: Path, data: Path, tmp_path: Path) -> list[float]:
    """log p(chosen) - log p(rejected) per pair, the version alone through PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    if ref is not None:
        model = PeftModel.from_pretrained(
            model, str(registry.export(ref, tmp_path / ref.replace("@", "-")))
        )
    model.eval()

    def logp(prompt: str, answer: str) -> float:
        p = tok(prompt)["input_ids"]
        full = tok(prompt + answer)["input_ids"] + [tok.eos_token_id]  # as TRL tokenizes: EOS added
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([full])).logits[0, :-1].float()
        lp = torch.log_softmax(logits, -1)[torch.arange(len(full) - 1), torch.tensor(full[1:])]
        return float(lp[len(p) - 1 :].double().sum())

    return [logp(p, c) - logp(p, r) for p, c, r in PAIRS]


def test_pref_metrics_of_many_versions_in_one_pass_equal_each_alone(
    registry, versions, tiny_llama, tmp_path
):
    result = evaluate(
        ["m@1", "m@2"], versions, "preference", "pref", registry=registry, base_line=True
    )
    for ref in ("m@1", "m@2", None):
        margins = alone(registry, ref, tiny_llama, versions, tmp_path)
        got = result.scores[ref]
        assert abs(got["pref_margin"] - sum(margins) / len(margins)) <= TOLERANCE, ref
        assert got["pref_acc"] == sum(m > 0 for m in margins) / len(margins), ref
    assert result.scores["m@2"]["pref_acc"] == 1.0  # DPO learned the toy preference
    assert result.scores["m@2"]["pref_margin"] > result.scores["m@1"]["pref_margin"]
    assert len(result.records) == 2 and result.records[0].metrics.keys() == {
        "pref_acc",
        "pref_margin",
    }


def test_cli_eval_pref_and_a_tag_gate(cli, home, registry, versions):
    code, out, err = cli(
        "eval", "m@1", "m@2", "--data", str(versions), "--format", "preference", "--metrics", "pref"
    )
    assert code == 0, err
    assert "PREF_ACC" in out and "PREF_MARGIN" in out and "stored on m@1, m@2" in out
    code, out, err = cli("tag", "m@2", "prod", "--require", "pref_acc>=0.7")
    assert code == 0 and "gate passed: pref_acc 1 >= 0.7" in err.replace("1.0", "1"), err
    before = snapshot(home)
    refused(
        cli,
        home,
        before,
        "tag",
        "m@1",
        "prod",
        "--require-better-than",
        "m@2",
        match="m@1",
        last=True,
    )
    refused(cli, home, before, "eval", "m@1", "--data", str(versions), "--format", "preference",
            "--metrics", "loss", match="loss score SFT data; the preference format gives preference records")  # fmt: skip
    alpaca = versions.parent / "a.jsonl"
    alpaca.write_text(json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n")
    refused(cli, home, before, "eval", "m@1", "--data", str(alpaca), "--format", "alpaca",
            "--metrics", "pref_acc", match="pref_acc score preference pairs")  # fmt: skip
