"""adaptr train on bad input, interrupted, resumed, and under accelerate launch."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import refused, run_adaptr, snapshot, write_adapter

ROOT = Path(__file__).parent.parent
ZH_EN = ROOT / "examples" / "data" / "translate_zh_en.jsonl"


@pytest.fixture
def populated(cli, home, tmp_path):
    assert cli("add", "legal", str(write_adapter(tmp_path / "legal")), "--tag", "prod")[0] == 0
    return snapshot(home)


def _bert(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    ).save_pretrained(tmp_path / "bert")
    return tmp_path / "bert"


@pytest.mark.parametrize(
    "case, match",
    [
        ("base-missing", "base './no/such/model' not found"),
        ("base-not-a-model", "is not a model folder (no config.json)"),
        (
            "base-not-causal",
            "is not a causal language model (model_type 'bert', architectures ['BertModel'])",
        ),
        ("data-missing", "data file"),
        ("data-empty", "holds no records"),
        ("data-malformed", "line 2 is not valid JSON (column"),
        (
            "data-missing-field",
            "line 1: field 'output' is missing (the alpaca format needs instruction, output)",
        ),
        ("unknown-format", "unknown format 'alpacca': did you mean 'alpaca'?"),
        ("unknown-family", "unknown family 'phi9'"),
        (
            "bad-target",
            "the model has no module 'qkv_proj'; its linear layers are: down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
        ),
        (
            "unknown-recipe-key",
            "unknown recipe key sft.num_train_epoch (not a SFTConfig field you can set); did you mean 'num_train_epochs'?",
        ),
        ("bad-recipe-yaml", "is not valid YAML"),
        ("no-name", "no name given: pass --name"),
        ("bad-name", "invalid adapter name 'Zh/En'"),
        ("bad-eval-split", "data.eval_split must be a fraction"),
        ("resume-nothing", "nothing to resume"),
        ("unknown-parent", "unknown adapter 'ghost'"),
    ],
)
def test_refused(cli, home, tmp_path, populated, tiny_llama, case, match):
    args = {
        "--base": str(tiny_llama),
        "--data": str(ZH_EN),
        "--format": "alpaca",
        "--name": "zh-en",
        "--max-steps": "1",
    }
    extra: list[str] = []
    bad = tmp_path / "bad.jsonl"
    if case == "base-missing":
        args["--base"] = "./no/such/model"
    elif case == "base-not-a-model":
        (tmp_path / "empty").mkdir()
        args["--base"] = str(tmp_path / "empty")
    elif case == "base-not-causal":
        args["--base"] = str(_bert(tmp_path))
    elif case == "data-missing":
        args["--data"] = str(tmp_path / "nope.jsonl")
    elif case == "data-empty":
        bad.write_text("")
        args["--data"] = str(bad)
    elif case == "data-malformed":
        bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n')
        args["--data"] = str(bad)
    elif case == "data-missing-field":
        bad.write_text('{"instruction": "a"}\n')
        args["--data"] = str(bad)
    elif case == "unknown-format":
        args["--format"] = "alpacca"
    elif case == "unknown-family":
        extra = ["--family", "phi9"]
    elif case == "bad-target":
        extra = ["--targets", "q_proj,qkv_proj"]
    elif case == "unknown-recipe-key":
        extra = ["--set", "sft.num_train_epoch=2"]
    elif case == "bad-recipe-yaml":
        (tmp_path / "r.yaml").write_text("sft: [unclosed\n")
        extra = ["--recipe", str(tmp_path / "r.yaml")]
    elif case == "no-name":
        del args["--name"]
    elif case == "bad-name":
        args["--name"] = "Zh/En"
    elif case == "bad-eval-split":
        extra = ["--eval-split", "1.5"]
    elif case == "resume-nothing":
        extra = ["--resume"]
    elif case == "unknown-parent":
        extra = ["--from", "ghost@1"]
    flat = [x for kv in args.items() for x in kv]
    refused(cli, home, populated, "train", *flat, *extra, match=match, last=True)


def test_quantization_where_bitsandbytes_cannot_run(cli, home, populated, tiny_llama, monkeypatch):
    import adaptr.runtime

    monkeypatch.setattr(adaptr.runtime, "bitsandbytes_problem", lambda: "no supported device (test)")
    refused(cli, home, populated, "train", "--base", str(tiny_llama), "--data", str(ZH_EN), "--format", "alpaca", "--name", "q",
            "--quantization", "4bit", match="quantization 4bit needs bitsandbytes, which cannot run here: no supported device (test); use --quantization none", last=True)  # fmt: skip


TRAIN = ["--data", str(ZH_EN), "--format", "alpaca", "--name", "long", "--batch-size", "2", "--lr", "1e-3",
         "--no-gradient-checkpointing", "--set", "sft.save_steps=2"]  # fmt: skip


def test_ctrl_c_leaves_the_registry_unchanged_and_resume_continues(home, tmp_path, tiny_llama):
    from adaptr.registry import Registry

    write = Registry(home)
    write.add("legal", write_adapter(tmp_path / "legal"))
    before = snapshot(home)
    env = {**os.environ, "ADAPTR_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from adaptr.cli import run; run()", "train", "--base", str(tiny_llama), *TRAIN, "--max-steps", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    run_dir = home / "runs" / "long"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(run_dir.glob("checkpoint-*"))) < 2:
            time.sleep(0.2)
        assert list(run_dir.glob("checkpoint-*")), "no checkpoint was written"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:  # a failure here must not leave a training process running
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("error: training of long interrupted at step ")
        and "continue with --resume" in last
    )
    assert "Traceback" not in err
    assert snapshot(home) == before

    # without --resume the leftover checkpoints are not silently discarded
    r = run_adaptr("train", "--base", str(tiny_llama), *TRAIN, "--max-steps", "3", home=home)
    assert (
        r.returncode != 0
        and "pass --resume to continue it or --restart" in r.stderr.strip().splitlines()[-1]
    )
    assert snapshot(home) == before

    from adaptr.training.steps import checkpoint_complete

    # the interrupt may land while a checkpoint is being written: resume takes the newest whole one
    ordered = sorted(run_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    checkpoints = [c for c in ordered if checkpoint_complete(c)]
    step = int(checkpoints[-1].name.split("-")[1])
    r = run_adaptr(
        "train",
        "--base",
        str(tiny_llama),
        *TRAIN,
        "--max-steps",
        str(step + 2),
        "--resume",
        home=home,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    v = Registry(home).get("long")
    assert (
        v.lineage["resumed_from"].endswith(checkpoints[-1].name) and v.metrics["steps"] == step + 2
    )
    assert not run_dir.exists()


@pytest.mark.slow
def test_accelerate_launch_two_processes_only_rank_zero_writes(home, tiny_llama):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which(
        "accelerate"
    )
    assert accelerate, "accelerate is a dependency and should be installed"
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "adaptr", "train", "--base", str(tiny_llama), "--data", str(ZH_EN),
           "--format", "alpaca", "--name", "ddp", "--max-steps", "3", "--batch-size", "2", "--no-gradient-checkpointing"]  # fmt: skip
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env={**os.environ, "ADAPTR_HOME": str(home)},
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    from adaptr.registry import Registry

    versions = Registry(home).list("ddp")
    assert [v.version for v in versions] == [1]  # one version, written by rank 0 only
    assert r.stdout.count("ddp@1") == 1
    assert versions[0].metrics["steps"] == 3
    assert json.loads(json.dumps(versions[0].lineage))["dataset"]["records"] == 24


def test_resume_skips_a_checkpoint_cut_short(tmp_path):
    from adaptr.training.steps import prepare_run_dir

    run = tmp_path / "run"
    for step, whole in ((2, True), (4, True), (6, False)):
        c = run / f"checkpoint-{step}"
        c.mkdir(parents=True)
        (c / "trainer_state.json").write_text(
            f'{{"global_step": {step}}}' if whole else '{"global_st'
        )
    assert prepare_run_dir(run, resume=True, restart=False, name="x").endswith("checkpoint-4")
    assert not (run / "checkpoint-6").exists()


def test_the_first_ctrl_c_stops_training_after_its_step_and_a_second_interrupts():
    """The first SIGINT only sets a flag the Trainer reads after each step, so it cannot be
    lost in a finalizer ("Exception ignored in …"); a second raises KeyboardInterrupt."""
    from transformers import TrainerControl

    from adaptr.training.callbacks import StopOnInterrupt

    stop = StopOnInterrupt()
    before = signal.getsignal(signal.SIGINT)
    with stop.catching_sigint():
        control = stop.on_step_end(None, None, TrainerControl())
        assert not control.should_training_stop
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested  # the handler ran, no KeyboardInterrupt
        assert stop.on_step_end(None, None, TrainerControl()).should_training_stop
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the interrupt lands before this ends
    assert signal.getsignal(signal.SIGINT) is before
