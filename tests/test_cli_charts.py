"""cli.charts: `adaptr curves` in the terminal and as PNG, from the log history training stores."""

from __future__ import annotations

import json
from pathlib import Path

from adaptr.registry import Registry

from helpers import LORA, random_lora, refused


def test_curves_terminal_and_png(tmp_path, tiny_llama, cli):
    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    history = [
        {"step": s, "loss": 3 / s, "learning_rate": 1e-4 * (1 - s / 10)} for s in range(1, 10)
    ]
    history.append({"step": 9, "eval_loss": 0.9})
    reg.add("c", random_lora(tiny_llama, tmp_path / "c", 1, **LORA), base="tiny",
            lineage={"log_history": history})  # fmt: skip
    reg.add("c", random_lora(tiny_llama, tmp_path / "c2", 2, **LORA), base="tiny",
            lineage={"log_history": history[:5], "parents": ["c@1"]})  # fmt: skip
    png = tmp_path / "curves.png"
    code, out, err = cli(
        "--home", str(tmp_path / "home"), "curves", "c@1", "c@2", "--png", str(png)
    )
    assert code == 0, err
    assert "c@1" in out and "c@2" in out and "eval_loss" in out and "3.0000 -> 0.3333" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    from matplotlib import image

    assert image.imread(png).shape[:2] == (450, 800)
    code, out, err = cli("--home", str(tmp_path / "home"), "curves", "c@2", "--parents", "--json")
    assert code == 0 and list(json.loads(out)["curves"]) == ["c@2", "c@1"], err
    code, out, _ = cli("--home", str(tmp_path / "home"), "show", "c@1")
    assert "training log" in out and "10 entries" in out
    reg.add("plain", random_lora(tiny_llama, tmp_path / "p", 3, **LORA), base="tiny")
    refused(cli, None, None, "--home", str(tmp_path / "home"), "curves", "plain",
            match="no stored training log")  # fmt: skip


def test_training_stores_its_log_history_for_curves(tmp_path, tiny_llama, cli):
    from adaptr import evaluate
    from adaptr.training.trainer import train

    zh_en = Path(__file__).parent.parent / "examples" / "data" / "translate_zh_en.jsonl"
    reg = Registry(tmp_path / "home")
    reg.add_base("tiny", tiny_llama)
    result = train(
        {"name": "zh", "base": {"path": "tiny"},
         "data": {"path": str(zh_en), "format": "alpaca", "eval_split": 0.25},
         "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
         "sft": {"max_steps": 3, "logging_steps": 1, "per_device_train_batch_size": 4,
                 "gradient_checkpointing": False, "learning_rate": 1e-2}},
        registry=reg, progress=False,
    )  # fmt: skip
    history = result.version.lineage["log_history"]
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3]
    assert any("eval_loss" in h for h in history) and any("learning_rate" in h for h in history)
    code, out, err = cli("--home", str(tmp_path / "home"), "curves", "zh@1", "--json")
    assert code == 0, err
    assert [p[0] for p in json.loads(out)["curves"]["zh@1"]["loss"]] == [1, 2, 3]
    # a trained version is scored like any other, with Chinese references
    r = evaluate(["zh@1"], zh_en, "alpaca", "loss,chrf", registry=reg, limit=3, max_new_tokens=4)
    assert r.scores["zh@1"]["loss"] > 0 and 0 <= r.scores["zh@1"]["chrf"] <= 100
    assert len(reg.evals("zh@1")) == 1
