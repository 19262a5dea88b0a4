"""compose / merge / stacked inference: math checked against PEFT, lineage, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adaptr import inference
from adaptr.compose import METHODS, compose
from adaptr.errors import (
    IncompatibleBaseError,
    InvalidInputError,
    NotFoundError,
)
from adaptr.merge import merge

from helpers import refused, snapshot, write_adapter

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8, 120, 33]])


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_llama):
    """Random-B LoRA adapters on the tiny LLaMA: different alphas, ranks, rsLoRA, DoRA."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("compose-adapters")
    specs = {
        "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "b": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"]),
        "r8": dict(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "rs": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True),
    }
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(10 + i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(tiny_llama),
            LoraConfig(init_lora_weights=False, **spec),
        )
        with torch.no_grad():  # small deltas keep the logits in a well-conditioned range
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.mul_(0.5)
        model.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def reg(registry, tiny_llama, adapters):
    registry.add_base("tiny", tiny_llama)
    for name, path in adapters.items():
        registry.add(name, path, base="tiny")
    return registry


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def adapter_logits(registry, *refs) -> torch.Tensor:
    model, _, _ = inference.load(registry, list(refs))
    return logits(model)


def test_linear_one_zero_reproduces_the_first(reg):
    v = compose(reg, ["a", "b"], [1.0, 0.0], "linear", "lin")
    assert (adapter_logits(reg, "lin") - adapter_logits(reg, "a")).abs().max() < 1e-5
    assert (
        v.lineage["parents"] == ["a@1", "b@1"]
        and v.lineage["weights"] == [1.0, 0.0]
        and v.lineage["combination"] == "linear"
    )


def test_cat_one_one_reproduces_both_applied_together_with_different_alphas(reg):
    compose(reg, ["a", "b"], [1.0, 1.0], "cat", "both")
    stacked = adapter_logits(reg, "a", "b")
    assert (adapter_logits(reg, "both") - stacked).abs().max() < 1e-5
    assert (stacked - adapter_logits(reg, "a")).abs().max() > 1e-3  # b really contributes
    assert reg.get("both").r == 8  # cat: ranks add up


def test_rslora_scaling_is_corrected(reg, tiny_llama):
    """PEFT copies use_rslora onto the combined adapter although the scaling is already in its weights."""
    compose(reg, ["rs", "a"], [1.0, 0.0], "linear", "rs-lin")
    assert reg.get("rs-lin").summary["use_rslora"] is False
    assert (adapter_logits(reg, "rs-lin") - adapter_logits(reg, "rs")).abs().max() < 1e-5
    # and PEFT on its own gets it wrong: the same call without adaptr's correction
    model, _, _ = inference.load(reg, ["rs", "a"])
    model.add_weighted_adapter(
        ["rs@1", "a@1"], [1.0, 0.0], adapter_name="raw", combination_type="linear"
    )
    model.set_adapter("raw")
    assert (logits(model) - adapter_logits(reg, "rs")).abs().max() > 1e-3


def test_dora_is_refused_with_a_reason(reg, home):
    before = snapshot(home)
    with pytest.raises(
        InvalidInputError,
        match="uses DoRA, whose magnitude vectors PEFT's add_weighted_adapter cannot combine",
    ):
        compose(reg, ["dora", "a"], [0.5, 0.5], "linear", "x")
    assert snapshot(home) == before


@pytest.mark.parametrize("method", METHODS)
def test_every_method_makes_a_version(reg, method):
    opts = (
        {"density": 0.5}
        if method in ("ties", "dare_linear", "dare_ties", "magnitude_prune")
        else {}
    )
    v = compose(reg, ["a", "b"], [0.7, 0.3], method, f"m-{method.replace('_', '-')}", **opts)
    recorded = (
        {**opts, "majority_sign_method": "total"} if method in ("ties", "dare_ties") else opts
    )
    assert v.lineage["combination"] == method and v.lineage["options"] == recorded
    assert torch.isfinite(adapter_logits(reg, v.ref)).all()


@pytest.mark.parametrize(
    "refs, weights, method, opts, error, match",
    [
        (["a", "b"], [1.0], "linear", {}, InvalidInputError, "1 weight(s) for 2 adapter(s)"),
        (
            ["a", "b"],
            [1, 1],
            "ties",
            {"density": -0.5},
            InvalidInputError,
            "density must be in (0, 1]",
        ),
        (["a", "b"], [1, 1], "ties", {}, InvalidInputError, "needs --density"),
        (["a", "b"], [1, 1], "average", {}, InvalidInputError, "unknown method 'average'"),
        (
            ["a", "r8"],
            [1, 1],
            "linear",
            {},
            InvalidInputError,
            "needs adapters of equal rank (a@1: r=4, r8@1: r=8); use cat or svd",
        ),
        (["a", "ghost"], [1, 1], "linear", {}, NotFoundError, "unknown adapter 'ghost'"),
        (["a", "b"], [1, float("nan")], "linear", {}, InvalidInputError, "finite numbers"),
        (["a", "b"], [1, float("inf")], "cat", {}, InvalidInputError, "got [1.0, inf]"),
    ],
)
def test_refused_up_front(reg, home, refs, weights, method, opts, error, match):
    before = snapshot(home)
    with pytest.raises(
        error, match=match.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        compose(reg, refs, weights, method, "bad", **opts)
    assert snapshot(home) == before


def test_adapters_on_different_bases_are_refused(reg, home, tmp_path, adapters):
    from adaptr.tiny import save_tiny_base

    other = save_tiny_base(
        tmp_path / "other", "llama", seed=3
    )  # same shapes, other weights: another fingerprint? no:
    reg.add_base(
        "other", other
    )  # identical architecture gives the same fingerprint, so force a different base name
    reg.add("c", adapters["a"], base="other")
    before = snapshot(home)
    with pytest.raises(IncompatibleBaseError, match="different bases"):
        compose(reg, ["a", "c"], [1, 1], "cat", "x")
    with pytest.raises(IncompatibleBaseError, match="different bases"):
        merge(reg, ["a", "c"], tmp_path / "m")
    assert snapshot(home) == before


def test_merge_writes_a_standalone_model_matching_base_plus_adapter(reg, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    record = merge(reg, ["b"], tmp_path / "merged")
    files = {p.name for p in (tmp_path / "merged").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "adaptr_merge.json",
    } <= files
    assert not any("adapter" in f for f in files - {"adaptr_merge.json"})
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not hasattr(model, "peft_config")
    assert (logits(model) - adapter_logits(reg, "b")).abs().max() <= 1e-4
    assert AutoTokenizer.from_pretrained(tmp_path / "merged")("hi").input_ids
    assert record.refs == ["b@1"] and record.dtype == "float32" and "full-precision" in record.path


def _killed_work_folder(kind: str, parent: Path | None, env: dict | None = None) -> Path:
    """The work folder of a real process killed (SIGKILL) while it had it."""
    import os
    import subprocess
    import sys

    code = (
        "import sys, os, signal; from pathlib import Path; from adaptr.registry import atomic\n"
        "w = atomic.work_dir(sys.argv[1], Path(sys.argv[2]) if sys.argv[2] != '-' else None)\n"
        "(w / 'model').mkdir(); (w / 'model' / 'part.bin').write_bytes(b'half')\n"
        "print(w, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, kind, str(parent) if parent else "-"],
        capture_output=True, text=True, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr
    leftover = Path(proc.stdout.strip())
    assert (leftover / "model" / "part.bin").exists()
    return leftover


USERS = ("adaptr-runs-20240115-final", ".adaptr-old-424242-notes", "adaptr-load-1-x",
         ".adaptr-merge-424242-abcdefgh", "adaptr-compose-424242-x1y2z3w4")  # fmt: skip


def _users_folders(root: Path) -> dict[str, bytes]:
    """Folders of a user's named like adaptr's work folders once were, each with a file."""
    for name in USERS:
        (root / name / "sub").mkdir(parents=True)
        (root / name / "sub" / "keep.txt").write_text(f"{name}: mine")
    return _files(root)


def _files(root: Path, names=USERS) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for name in names
        for p in sorted((root / name).rglob("*"))
        if p.is_file()
    }


def test_merge_force_replaces_the_folder_whole_and_tidies_a_killed_runs_leftovers(reg, tmp_path):
    leftover = _killed_work_folder("merge", tmp_path)  # a merge killed mid-write
    mine = _users_folders(tmp_path)
    merge(reg, ["a"], tmp_path / "merged")
    assert not leftover.exists()
    before = json.loads((tmp_path / "merged" / "adaptr_merge.json").read_text())
    merge(reg, ["b"], tmp_path / "merged", force=True)
    after = json.loads((tmp_path / "merged" / "adaptr_merge.json").read_text())
    assert before["refs"] == ["a@1"] and after["refs"] == ["b@1"]
    assert _files(tmp_path) == mine  # untouched, whatever their names
    assert sorted(p.name for p in tmp_path.iterdir() if "adaptr" in p.name) == sorted(USERS)
    assert not (tmp_path / "notes").exists()


def test_compose_sweeps_only_its_own_leftovers_in_the_temp_folder(reg, tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    leftover = _killed_work_folder("compose", None, env={"TMPDIR": str(tmp)})
    assert leftover.parent == tmp
    mine = _users_folders(tmp)
    monkeypatch.setattr("tempfile.tempdir", str(tmp))
    compose(reg, ["a", "b"], [1.0, 1.0], "linear", "blend")
    assert _files(tmp) == mine and not leftover.exists()
    assert sorted(p.name for p in tmp.iterdir()) == sorted(USERS)
    assert not (tmp / "notes").exists()


def test_merge_into_the_registry_home_is_refused(reg, home, tmp_path, cli):
    from helpers import refused

    before = snapshot(home)
    for out in (home / "blobs", home, tmp_path, home / "new"):
        refused(cli, home, before, "merge", "a", "--out", str(out), "--force",
                match="registry home")  # fmt: skip
        with pytest.raises(InvalidInputError, match="registry home"):
            merge(reg, ["a"], out, force=True)
    assert snapshot(home) == before and not (home / "new").exists()
    assert cli("verify")[0] == 0


GENERATE_STOPPED = """
import sys, time
import peft
def held(*args, **kwargs):  # the adapters are exported to the temp folder: hold there
    print("loading", flush=True)
    time.sleep(600)
peft.PeftModel.from_pretrained = held
from adaptr.cli import main
sys.exit(main(["generate", "a", "Hello", "--max-new-tokens", "2"]))
"""


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_a_stopped_generate_leaves_no_load_folder(reg, home, tmp_path, sig):
    import os
    import signal
    import subprocess
    import sys

    from adaptr.registry import atomic

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "ADAPTR_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-c", GENERATE_STOPPED], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "loading", proc.stderr.read()
        assert [p.name for p in tmp.iterdir() if p.is_dir()][0].startswith("adaptr-load-")
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
    finally:
        proc.kill()
    if sig == "SIGTERM":  # ends cleanly: the work folder is removed on the way out
        assert proc.returncode == 143 and "Traceback" not in proc.stderr.read()
    else:  # nothing runs after SIGKILL: the next run's sweep removes what it left
        assert proc.returncode == -9 and any(tmp.iterdir())
        atomic.sweep(tmp)
    assert list(tmp.iterdir()) == []


def test_merge_several_refs_equals_them_stacked(reg, tmp_path, cli):
    from transformers import AutoModelForCausalLM

    code, out, err = cli("merge", "a", "b", "--out", str(tmp_path / "ab"))
    assert code == 0, err
    assert "a@1, b@1 merged into tiny" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ab")
    assert (logits(model) - adapter_logits(reg, "a", "b")).abs().max() <= 1e-4
    assert json.loads((tmp_path / "ab" / "adaptr_merge.json").read_text())["refs"] == ["a@1", "b@1"]


def test_merge_refusals(reg, home, tmp_path, tiny_llama, cli):
    before = snapshot(home)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    code, _, err = cli("merge", "a", "--out", str(tmp_path / "full"))
    assert (
        code != 0
        and err.strip()
        == f"error: {tmp_path / 'full'} exists and is not empty; pass --force to replace it"
    )
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"
    code, _, err = cli(
        "merge", "a", "--out", str(tmp_path / "x"), "--base", str(tmp_path / "nowhere")
    )
    assert code != 0 and "base" in err and "not found" in err and len(err.strip().splitlines()) == 1
    quant = tmp_path / "quantized"
    import shutil

    shutil.copytree(tiny_llama, quant)
    cfg = json.loads((quant / "config.json").read_text())
    (quant / "config.json").write_text(
        json.dumps(
            {**cfg, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}}
        )
    )
    code, _, err = cli("merge", "a", "--out", str(tmp_path / "y"), "--base", str(quant))
    assert code != 0 and "is a quantized checkpoint" in err
    assert (
        snapshot(home) == before and not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    )


def test_merge_of_a_qlora_adapter_goes_through_full_precision(registry, tmp_path):
    from transformers import AutoModelForCausalLM

    from adaptr.tiny import save_tiny_base
    from adaptr.training.trainer import train

    base = save_tiny_base(tmp_path / "base64", "llama", hidden_size=64, intermediate_size=128)
    data = Path(__file__).parent.parent / "examples" / "data" / "translate_zh_en.jsonl"
    train({"name": "q", "base": {"path": str(base), "quantization": "4bit"}, "data": {"path": str(data), "format": "alpaca"},
           "lora": {"r": 4}, "sft": {"max_steps": 3, "per_device_train_batch_size": 4, "learning_rate": 5e-2}},
          registry=registry, progress=False)  # fmt: skip
    record = merge(registry, ["q"], tmp_path / "merged")
    assert record.adapters_trained_on_quantized_base == ["4bit"] and "dequantized" in record.path
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert (logits(merged) - adapter_logits(registry, "q")).abs().max() <= 1e-4
    assert merged.config.to_dict().get("quantization_config") is None
    # and quantized again on load, as adaptr_merge.json says
    from transformers import BitsAndBytesConfig

    q = AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged",
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32
        ),
    )
    assert type(q.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert (logits(q) - logits(merged)).abs().max() < 0.5  # 4-bit rounding, same model


def test_cli_compose_and_generate(reg, cli):
    code, out, err = cli(
        "compose",
        "a",
        "b",
        "--weights",
        "0.7,0.3",
        "--method",
        "svd",
        "--svd-rank",
        "2",
        "--name",
        "blend",
        "--tag",
        "try",
    )
    assert (code, out.strip()) == (0, "blend@1"), err
    v = reg.get("blend@try")
    assert v.r == 2 and v.lineage["options"] == {"svd_rank": 2}
    assert "lineage.combination  svd" in cli("show", "blend")[1]
    code, out, err = cli("generate", "a", "Hello", "--max-new-tokens", "4", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["adapters"] == ["a@1"] and isinstance(doc["completion"], str)
    cli("switch", "a", "b")  # stacked active adapters
    code, out, _ = cli("generate", "Hello", "--max-new-tokens", "4", "--json")
    assert json.loads(out)["adapters"] == ["a@1", "b@1"]
    code, out, _ = cli("generate", "a", "Hello", "--stack", "b", "--json", "--max-new-tokens", "4")
    assert json.loads(out)["adapters"] == ["a@1", "b@1"]
    code, _, err = cli("compose", "a", "b", "--weights", "1,x", "--name", "z")
    assert code != 0 and "--weights takes numbers" in err


def test_stacking_differs_from_each_alone_and_matches_cat(reg):
    stacked = adapter_logits(reg, "a", "b")
    compose(reg, ["a", "b"], [1, 1], "cat", "ab")
    assert (stacked - adapter_logits(reg, "ab")).abs().max() < 1e-5
    assert (stacked - adapter_logits(reg, "b")).abs().max() > 1e-3


def test_generate_and_compose_options(cli, home, tmp_path, tiny_llama):
    for name, seed in (("p0", 0), ("p1", 1)):
        src = write_adapter(tmp_path / name, seed=seed)
        assert cli("add", name, str(src), "--base", str(tiny_llama))[0] == 0
    before = snapshot(home)
    for args, match in (
        (("generate", "p0", ""), "the prompt is empty"),
        (("generate", "p0", "hi", "--max-new-tokens", "0"), "0 is not in the range x>=1"),
        (("generate", "p0", "hi", "--max-new-tokens", "9" * 30), "the model reads at most 512 tokens"),
        (("compose", "p0", "--name", "c", "--weights", "nan"), "weights must be finite numbers (--weights), got [nan]"),
        (("compose", "p0", "p1", "--name", "c", "--weights", "1,inf"), "weights must be finite numbers (--weights), got [1.0, inf]"),
        (("compose", "p0", "p1", "--name", "c", "--method", "svd", "--svd-rank", "-1"), "-1 is not in the range x>=1"),
    ):  # fmt: skip
        refused(cli, home, before, *args, match=match)
