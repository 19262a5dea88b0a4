"""adaptr train: LoRA and QLoRA through SFTTrainer, recipes, lineage, faithful math."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptr.errors import NotFoundError
from adaptr.registry import Registry
from adaptr.training.trainer import train

from helpers import alpaca_file, recipe, snapshot

ROOT = Path(__file__).parent.parent
ZH_EN = ROOT / "examples" / "data" / "translate_zh_en.jsonl"
QUOTES = ROOT / "examples" / "data" / "quotes.jsonl"
FAST = ["--max-steps", "4", "--batch-size", "4", "--lr", "1e-2", "--no-gradient-checkpointing"]


def weights(registry: Registry, ref: str) -> dict[str, torch.Tensor]:
    return load_file(str(registry.path(ref)["adapter_model.safetensors"]))


def test_cli_train_stores_a_version_with_lineage(cli, registry, tiny_llama):
    code, out, err = cli("train", "--base", str(tiny_llama), "--data", str(ZH_EN), "--format", "alpaca", "--name", "zh-en",
                         "--eval-split", "0.25", "--targets", "all-linear", "--r", "4", "--tag", "exp", *FAST)  # fmt: skip
    assert code == 0, err
    assert out.startswith("zh-en@1  (train loss ") and "eval loss" in out and "perplexity" in out
    assert "trainable params:" in err
    v = registry.get("zh-en")
    assert (
        v.tags == ["exp"]
        and v.r == 4
        and set(v.target_modules)
        == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    )
    assert "training_args.bin" not in {f.path for f in v.files}
    lin = v.lineage
    assert lin["base"] == str(tiny_llama) and v.base_fingerprint
    assert (
        lin["dataset"]["sha256"]
        and lin["dataset"]["format"] == "alpaca"
        and lin["dataset"]["records"] == 24
    )
    assert lin["dataset"]["train_records"] == 18 and lin["dataset"]["eval"] == {
        "split": 0.25,
        "records": 6,
    }
    assert lin["recipe"]["lora"] == {"target_modules": "all-linear", "r": 4}
    assert lin["recipe"]["sft"]["max_steps"] == 4 and lin["seed"] == 42 and lin["family"] == "llama"
    assert {"torch", "transformers", "peft", "trl"} <= {
        k for k, val in lin["libraries"].items() if val
    }
    m = v.metrics
    assert m["steps"] == 4 and math.isfinite(m["train_loss"]) and m["duration_s"] > 0
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert not (registry.home / "runs" / "zh-en").exists()  # run folder cleaned after success


def test_python_api_and_registered_base(registry, tiny_llama):
    registry.add_base("tiny", tiny_llama)
    result = train(
        {"name": "quotes", "base": {"path": "tiny"}, "data": {"path": str(QUOTES), "format": "text", "options": {"field": "quote"}},
         "lora": {"r": 2, "target_modules": ["q_proj", "v_proj"]},
         "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_checkpointing": False}},
        registry=registry, progress=False,
    )  # fmt: skip
    v = result.version
    assert (
        v.ref == "quotes@1"
        and v.base == "tiny"
        and v.r == 2
        and sorted(v.target_modules) == ["q_proj", "v_proj"]
    )
    assert result.metrics["steps"] == 2


def test_completion_only_loss_is_on_for_prompt_completion_data(registry, tiny_llama):
    def run(name, **sft):
        r = train({"name": name, "base": {"path": str(tiny_llama)}, "data": {"path": str(ZH_EN), "format": "alpaca"},
                   "sft": {"max_steps": 1, "per_device_train_batch_size": 8, "gradient_checkpointing": False, "learning_rate": 1e-9, **sft}},
                  registry=registry, progress=False)  # fmt: skip
        return r.metrics["train_loss"], r.metrics["tokens"]

    default_loss, _ = run("a")
    full_loss, _ = run("b", completion_only_loss=False)
    assert default_loss != pytest.approx(full_loss, rel=1e-3)  # different tokens are scored


def test_packing_trains_on_fewer_longer_sequences(registry, tiny_llama):
    base = {
        "name": "p",
        "base": {"path": str(tiny_llama)},
        "data": {"path": str(QUOTES), "format": "text", "options": {"field": "quote"}},
    }
    sft = {
        "num_train_epochs": 1,
        "per_device_train_batch_size": 4,
        "gradient_checkpointing": False,
        "max_length": 128,
    }
    padded = train({**base, "sft": sft}, registry=registry, progress=False).metrics
    packed = train(
        {**base, "sft": {**sft, "packing": True}}, registry=registry, progress=False
    ).metrics
    assert packed["steps"] < padded["steps"]
    assert registry.get("p@2").lineage["recipe"]["sft"]["packing"] is True


@pytest.mark.parametrize("quant", ["4bit", "8bit"])
def test_qlora_trains_on_cpu(registry, tmp_path, quant):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from adaptr.tiny import save_tiny_base

    base = save_tiny_base(tmp_path / "base64", "llama", hidden_size=64, intermediate_size=128)
    r = train({"name": f"q{quant}", "base": {"path": str(base), "quantization": quant},
               "data": {"path": str(ZH_EN), "format": "alpaca"},
               "lora": {"r": 4}, "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 1e-2}},
              registry=registry, progress=False)  # fmt: skip
    v = r.version
    assert (
        math.isfinite(r.metrics["train_loss"])
        and v.lineage["recipe"]["base"]["quantization"] == quant
    )
    w = weights(registry, v.ref)
    assert any(
        t.abs().sum() > 0 for k, t in w.items() if "lora_B" in k
    )  # B moved from its zero init
    out = registry.export(v.ref, tmp_path / "exp")
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), out
    )  # loads on a full-precision base
    assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()


def test_continue_training_records_the_parent(cli, registry, tiny_llama):
    args = [
        "--base",
        str(tiny_llama),
        "--data",
        str(ZH_EN),
        "--format",
        "alpaca",
        "--name",
        "zh",
        "--r",
        "4",
        *FAST,
    ]
    assert cli("train", *args)[0] == 0
    code, out, err = cli("train", *args, "--from", "zh@1", "--r", "8")
    assert code == 0, err
    v = registry.get("zh@2")
    assert v.lineage["parents"] == ["zh@1"] and v.r == 4  # the parent's LoRA config carries on
    assert "lora settings are ignored" in err
    assert not all(
        torch.equal(a, b)
        for a, b in zip(
            weights(registry, "zh@1").values(), weights(registry, "zh@2").values(), strict=True
        )
    )


def _plain_trl(base: Path, out: Path, seed: int):
    """The seeds' recipe, by hand: LoraConfig + SFTTrainer on the same data and settings."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in ZH_EN.open(encoding="utf-8")]
    data = [
        {
            "prompt": f"### 指令:\n{r['instruction']}\n\n### 输入:\n{r['input']}\n\n### 回答:\n",
            "completion": r["output"],
        }
        for r in rows
    ]
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    args = SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2, seed=seed,
                     use_cpu=True, bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False)  # fmt: skip
    set_seed(seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data), processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))  # fmt: skip
    trainer.train()
    trainer.save_model(str(out))
    return load_file(str(out / "adapter_model.safetensors"))


def test_same_weights_as_the_plain_trl_recipe_and_deterministic(registry, tiny_llama, tmp_path):
    recipe = {"name": "faithful", "base": {"path": str(tiny_llama)}, "data": {"path": str(ZH_EN), "format": "alpaca"},
              "lora": {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
              "sft": {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "seed": 7, "gradient_checkpointing": False}}  # fmt: skip
    first = weights(registry, train(recipe, registry=registry, progress=False).version.ref)
    second = weights(registry, train(recipe, registry=registry, progress=False).version.ref)
    plain = _plain_trl(tiny_llama, tmp_path / "plain", seed=7)
    assert first.keys() == plain.keys() == second.keys()
    for k in plain:
        assert torch.equal(first[k], second[k]), k
        assert torch.equal(first[k], plain[k]), k
    assert any(t.abs().sum() > 0 for k, t in plain.items() if "lora_B" in k)


def test_separate_eval_file(registry, tiny_llama, tmp_path):
    rows = ZH_EN.read_text(encoding="utf-8").splitlines()
    (tmp_path / "train.jsonl").write_text("\n".join(rows[:20]) + "\n", encoding="utf-8")
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[20:]) + "\n", encoding="utf-8")
    r = train({"name": "ev", "base": {"path": str(tiny_llama)},
               "data": {"path": str(tmp_path / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl"), "format": "alpaca"},
               "sft": {"max_steps": 2, "per_device_train_batch_size": 4, "gradient_checkpointing": False}},
              registry=registry, progress=False)  # fmt: skip
    ds = r.version.lineage["dataset"]
    assert (
        ds["train_records"] == 20 and ds["eval"]["records"] == 4 and len(ds["eval"]["sha256"]) == 64
    )
    assert math.isfinite(r.metrics["eval_loss"]) and r.metrics["perplexity"] == pytest.approx(
        math.exp(r.metrics["eval_loss"])
    )


# ---------------------------------------------------------- damaged checkpoints
class _Boom:
    """Unpickling this would create a file: proves a checkpoint is never unpickled freely."""

    def __reduce__(self):
        return (open, (str(MARKER), "w"))


MARKER = Path("/tmp/adaptr-checkpoint-unpickled-marker")


def _damage(checkpoint: Path, kind: str) -> None:
    if kind == "optimizer-pickle":
        (checkpoint / "optimizer.pt").write_bytes(pickle.dumps(_Boom()))
    elif kind == "rng-garbage":
        (checkpoint / "rng_state.pth").write_bytes(os.urandom(100))
    elif kind == "weights-truncated":
        p = checkpoint / "adapter_model.safetensors"
        p.write_bytes(p.read_bytes()[:-64])
    elif kind == "state-not-object":
        (checkpoint / "trainer_state.json").write_text("[]")


def test_resume_from_a_damaged_checkpoint(cli, home, tmp_path, tiny_llama):
    data = Path(__file__).parent.parent / "examples" / "data" / "translate_zh_en.jsonl"
    args = ["train", "--base", str(tiny_llama), "--data", str(data), "--format", "alpaca",
            "--name", "r", "--batch-size", "2", "--no-gradient-checkpointing",
            "--set", "sft.save_steps=1"]  # fmt: skip
    code, _, err = cli(*args, "--max-steps", "2", "--keep-run")
    assert code == 0, err[-2000:]
    run = home / "runs" / "r"
    shutil.copytree(run, tmp_path / "run-backup")
    before = snapshot(home)
    for kind in ("optimizer-pickle", "rng-garbage", "weights-truncated", "state-not-object"):
        shutil.rmtree(run)
        shutil.copytree(tmp_path / "run-backup", run)
        _damage(run / "checkpoint-2", kind)
        MARKER.unlink(missing_ok=True)
        code, out, err = cli(*args, "--max-steps", "4", "--resume")
        last = err.strip().splitlines()[-1]
        assert code != 0 and "internal error" not in last and "Traceback" not in err, (kind, err)
        assert last.startswith(f"error: checkpoint {run / 'checkpoint-2'} cannot be read ("), last
        assert last.endswith(
            "start over with --restart, or delete that folder to resume from an earlier checkpoint"
        )
        assert len(last) < 400 and not MARKER.exists()
        assert snapshot(home) == before
    # deleting the damaged checkpoint resumes from the one before it
    shutil.rmtree(run / "checkpoint-2")
    code, out, err = cli(*args, "--max-steps", "3", "--resume")
    assert code == 0 and out.startswith("r@2"), err[-2000:]


def test_folders_that_only_look_like_checkpoints_are_not_a_crash(tmp_path):
    from adaptr.training.steps import prepare_run_dir

    run = tmp_path / "run"
    (run / "checkpoint-final").mkdir(parents=True)
    (run / "checkpoint-²").mkdir()
    (run / "checkpoint-3").write_text("a file")
    with pytest.raises(NotFoundError, match="nothing to resume"):
        prepare_run_dir(run, resume=True, restart=False, name="x")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"data": {"format": "alpacca"}}, "unknown format 'alpacca': did you mean 'alpaca'?"),
        ({"base": {"path": "/nonexistent/model"}}, "base '/nonexistent/model' not found"),
        ({"data": {"format": "messages"}}, "field 'messages' is missing"),
        ({"name": "Bad Name"}, "Bad Name"),
        ({"data": {"over_length": "cut"}}, "data.over_length must be one of"),
    ],
)
def test_mistakes_are_found_before_torch_loads(tiny_llama, tmp_path, change, message):
    data = alpaca_file(tmp_path / "d.jsonl")
    doc = recipe("ok", tiny_llama, data)
    for key, value in change.items():
        doc[key] = {**doc[key], **value} if isinstance(value, dict) else value
    script = (
        "import json, sys\nfrom adaptr.training.trainer import plan\nfrom adaptr.registry import Registry\n"
        f"try:\n    plan(json.loads({json.dumps(json.dumps(doc))}), Registry({str(tmp_path / 'h')!r}))\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
        "print('torch loaded' if 'torch' in sys.modules else 'no torch')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert message in out.stdout, out.stdout + out.stderr
    assert out.stdout.rstrip().endswith("no torch")
