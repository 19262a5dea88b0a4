"""adaptr's registry served by vLLM: the resolver's logic (always) and a real vLLM server
(when a vLLM venv is available: ``.venv-vllm`` or ``ADAPTR_VLLM_PYTHON``; skipped otherwise)."""

from __future__ import annotations

import json

import pytest

from helpers import write_adapter


# -- the resolver's logic, without vLLM -------------------------------------------------------
@pytest.fixture
def two_bases(tmp_path, registry, tiny_llama):
    from adaptr.tiny import save_tiny_base

    registry.add_base("tiny", tiny_llama)
    registry.add_base("other", save_tiny_base(tmp_path / "other", "llama", initializer_range=0.5))
    return registry


def test_problems_name_each_reason():
    from adaptr.serving.vllm.compat import lora_rank_setting, max_rank, problems

    plain = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]}
    assert problems(plain) == [] and problems(plain, max_lora_rank=8) == []
    assert "--max-lora-rank 16" in problems({**plain, "r": 9}, max_lora_rank=8)[0]
    assert "DoRA" in problems({**plain, "use_dora": True})[0]
    assert "modules_to_save: lm_head" in problems({**plain, "modules_to_save": ["lm_head"]})[0]
    assert "lora_bias" in problems({**plain, "lora_bias": True})[0]
    assert "trainable_token_indices" in problems({**plain, "trainable_token_indices": [1]})[0]
    assert (
        "embeddings (embed_tokens)"
        in problems(plain, ["base_model.model.model.embed_tokens.lora_embedding_A"])[0]
    )
    assert "LoRA adapters only" in problems({"peft_type": "IA3"})[0]
    assert max_rank({**plain, "rank_pattern": {"q_proj": 40}}) == 40
    assert lora_rank_setting(40) == 64 and lora_rank_setting(8) == 8


def test_source_links_blobs_and_follows_tags(tmp_path, two_bases):
    from adaptr.serving.vllm.source import RegistrySource

    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a1", seed=1), base="tiny")
    reg.add("qa", write_adapter(tmp_path / "a2", seed=2), base="tiny")
    reg.tag("qa@1", "prod")
    src = RegistrySource(reg.home, base="tiny")
    one = src.resolve("qa@prod")
    assert one.version_ref == "qa@1" and one.lora_name.startswith("qa@1~")
    weights = one.path / "adapter_model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent.parent == reg.blobs.root.resolve()
    assert json.loads((one.path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert src.resolve("qa@1") == type(one)("qa@1", "qa@1", one.lora_name, one.path)
    assert src.resolve("qa").version_ref == "qa@2"
    reg.tag("qa@2", "prod")
    two = src.resolve("qa@prod")
    assert two.version_ref == "qa@2" and two.lora_name != one.lora_name and two.path != one.path
    assert src.refs() == ["qa", "qa@1", "qa@2", "qa@prod"]
    reg.remove("qa@1")
    assert src.resolve("qa@1") is None and src.resolve("nope") is None
    assert src.resolve("../etc") is None and src.resolve("Bad Name") is None


def test_source_refuses_wrong_base_and_unservable(tmp_path, two_bases, peft_adapters):
    from adaptr.serving.vllm.source import Refused, RegistrySource

    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a", seed=1), base="tiny")
    reg.add("big", write_adapter(tmp_path / "b", r=16), base="tiny")
    reg.add("dora", peft_adapters["dora"], base="tiny")
    with pytest.raises(Refused, match=r"qa@1 was made for base tiny, but this server runs other"):
        RegistrySource(reg.home, base="other").resolve("qa")
    assert RegistrySource(reg.home, base="other").refs() == []
    src = RegistrySource(reg.home, base="tiny", max_lora_rank=8)
    with pytest.raises(Refused, match=r"big@1: its rank 16 is above .* --max-lora-rank 8"):
        src.resolve("big")
    with pytest.raises(Refused, match="DoRA"):
        src.resolve("dora")
    # a server started on the base's folder (no registered name) is checked by fingerprint
    served = RegistrySource(reg.home, served_model=reg.get_base("other").path)
    with pytest.raises(Refused, match="made for base tiny"):
        served.resolve("qa")
    assert RegistrySource(reg.home, served_model=reg.get_base("tiny").path).resolve("qa")


def test_check_command(cli, tmp_path, two_bases, peft_adapters):
    reg = two_bases
    reg.add("qa", write_adapter(tmp_path / "a", r=16), base="tiny")
    reg.add("dora", peft_adapters["dora"], base="tiny")
    code, out, err = cli("check", "qa", "--engine", "vllm")
    assert code == 0 and "qa@1: vLLM can serve it (rank 16: --max-lora-rank 16" in out
    code, out, err = cli("check", "qa", "--max-lora-rank", "8", "--base", "other")
    assert code != 0 and err.count("\n") == 1 and "made for base tiny" in err
    assert "--max-lora-rank 16" in err
    code, out, err = cli("check", "dora", "--json")
    doc = json.loads(out)
    assert code == 1 and not doc["ok"] and "DoRA" in doc["problems"][0]
    code, out, err = cli("export", "dora", str(tmp_path / "out"), "--format", "vllm")
    assert code != 0 and "DoRA" in err and not (tmp_path / "out").exists()
    code, out, err = cli("check", "nope")
    assert code != 0 and err.startswith("error: ")
