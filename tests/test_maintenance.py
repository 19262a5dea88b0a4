"""registry.maintenance: export writes plain PEFT folders that load unchanged and give the same
logits; verify catches a flipped byte."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from adaptr.registry import Registry

from helpers import refused, run_adaptr, snapshot, write_adapter


def _logits(base_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", ["plain", "dora", "all-linear", "embed"])
def test_export_gives_identical_logits(registry, tmp_path, tiny_llama, peft_adapters, kind):
    src = peft_adapters[kind]
    v = registry.add(kind, src, base=str(tiny_llama))
    assert v.base_fingerprint is not None
    out = registry.export(v.ref, tmp_path / "exported")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for p in src.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes()
    expected, got = _logits(tiny_llama, src), _logits(tiny_llama, out)
    assert torch.equal(expected, got)
    bare = _bare_logits(tiny_llama)
    assert not torch.allclose(bare, got)  # the adapter really changes the output


def _bare_logits(base_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 99, 3, 250, 42, 7, 8]])).logits


def test_records_peft_variants(registry, tiny_llama, peft_adapters):
    dora = registry.add("dora", peft_adapters["dora"], base=str(tiny_llama))
    assert dora.summary["use_dora"] and dora.summary["use_rslora"]
    embed = registry.add("embed", peft_adapters["embed"], base=str(tiny_llama))
    assert embed.summary["rank_pattern"] == {"q_proj": 2}
    allin = registry.add("all-linear", peft_adapters["all-linear"], base=str(tiny_llama))
    assert allin.summary["lora_bias"] is True and allin.summary["lora_modules"] == 14


def test_export_vllm_format(cli, home, tmp_path, tiny_llama, peft_adapters):
    assert cli("add", "plain", str(peft_adapters["plain"]), "--base", str(tiny_llama))[0] == 0
    code, out, _ = cli("export", "plain", str(tmp_path / "v"), "--format", "vllm")
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "v").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    cli("add", "dora", str(peft_adapters["dora"]), "--base", str(tiny_llama))
    code, _, err = cli("export", "dora", str(tmp_path / "d"), "--format", "vllm")
    assert code != 0 and "DoRA" in err and not (tmp_path / "d").exists()


def test_export_refuses_a_corrupt_store(registry, tmp_path, peft_adapters):
    from adaptr.errors import IntegrityError

    v = registry.add("plain", peft_adapters["plain"])
    blob = registry.blobs.path(
        next(f.sha256 for f in v.files if f.path == "adapter_model.safetensors")
    )
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="corrupt"):
        registry.export("plain", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_add_an_sft_trainer_output_folder(registry, tmp_path, tiny_llama):
    """What SFTTrainer.save_model writes (adapter, tokenizer, training_args.bin) adds cleanly."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = tmp_path / "sft"
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_llama),
        args=SFTConfig(
            output_dir=str(out),
            max_steps=1,
            per_device_train_batch_size=2,
            report_to=[],
            save_strategy="no",
            max_length=32,
            use_cpu=True,
            bf16=False,
        ),
        train_dataset=Dataset.from_list([{"text": "hello world"}, {"text": "你好 世界"}]),
        processing_class=AutoTokenizer.from_pretrained(tiny_llama),
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    trainer.train()
    trainer.save_model(str(out))
    assert (out / "training_args.bin").exists()
    v = registry.add("sft", out, base=str(tiny_llama))
    paths = {f.path for f in v.files}
    assert (
        "training_args.bin" not in paths
        and {"adapter_model.safetensors", "tokenizer.json"} <= paths
    )
    assert (
        json.loads((registry.export("sft", tmp_path / "exp") / "adapter_config.json").read_text())[
            "r"
        ]
        == 4
    )
    shutil.rmtree(out)


def test_export_into_the_registry_home_is_refused_and_the_store_stays_whole(cli, home, tmp_path):
    assert cli("add", "a", str(write_adapter(tmp_path / "a")))[0] == 0
    (tmp_path / "link").symlink_to(home)
    before = snapshot(home)
    for out in (
        home / "blobs",
        home / "blobs" / "sha256",
        home,
        home / "fresh" / "dir",
        tmp_path,  # contains the home: replacing it would take the store with it
        tmp_path / "link" / "blobs",
    ):
        refused(cli, home, before, "export", "a", str(out), "--force", match="registry home")
    assert not (home / "fresh").exists()
    code, out, err = cli("verify")
    assert code == 0 and out.startswith("ok: 1 version(s)"), err
    assert cli("export", "a", str(tmp_path / "home2"))[0] == 0  # beside the home is fine


def test_verify_catches_a_flipped_byte_in_any_stored_file(home, tmp_path):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a", extra_files={"README.md": "card a"}))
    reg.add(
        "b",
        write_adapter(
            tmp_path / "b", seed=1, extra_files={"README.md": "card b", "tokenizer.json": "{}"}
        ),
    )
    rng = random.Random(7)
    blobs = sorted(reg.blobs.digests())
    assert len(blobs) == 6  # 7 files: the two identical configs are stored once
    for digest in blobs:
        path = reg.blobs.path(digest)
        original = path.read_bytes()
        offset = rng.randrange(len(original))
        damaged = bytearray(original)
        damaged[offset] ^= 1 << rng.randrange(8)
        path.chmod(0o644)
        path.write_bytes(bytes(damaged))
        holders = [f"{v.ref}/{f.path}" for v in reg.list() for f in v.files if f.sha256 == digest]
        report = reg.verify()
        assert [p.split(":")[0] for p in report.problems] == holders  # each version holding it
        assert all("content changed" in p for p in report.problems)
        r = run_adaptr("verify", home=home)
        assert r.returncode != 0 and "BAD" in r.stderr
        path.write_bytes(original)
        path.chmod(0o444)
        assert reg.verify().ok
    path.unlink()
    assert "missing" in reg.verify().problems[0]
