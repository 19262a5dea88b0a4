"""Base models: registration, fingerprints and refusing the wrong base."""

import json
import shutil

import pytest

from adaptr.errors import ConflictError, IntegrityError
from adaptr.registry.fingerprint import find_base_dir, read_base

from helpers import write_adapter


def test_fingerprint_is_stable_and_discriminating(tmp_path, tiny_llama):
    from adaptr.tiny import save_tiny_base

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(
        json.dumps({**cfg, "transformers_version": "0.0.1", "_name_or_path": "x"})
    )
    assert read_base(copy).fingerprint == read_base(tiny_llama).fingerprint
    wider = save_tiny_base(tmp_path / "wider", "llama", hidden_size=64)
    assert read_base(wider).fingerprint != read_base(tiny_llama).fingerprint
    neox = save_tiny_base(tmp_path / "neox", "gpt_neox")
    assert read_base(neox).fingerprint != read_base(tiny_llama).fingerprint


def test_hub_cache_lookup(tmp_path, monkeypatch, tiny_llama):
    snap = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    shutil.copytree(tiny_llama, snap)
    (tmp_path / "hub" / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_base_dir("org/tiny") == snap
    assert find_base_dir("org/other") is None


def test_base_add_list_and_adapter_attachment(cli, registry, home, tmp_path, tiny_llama):
    src = write_adapter(tmp_path / "a", base=str(tiny_llama))
    v1 = registry.add("legal", src)  # base found through base_model_name_or_path
    assert v1.base == str(tiny_llama) and v1.base_fingerprint == read_base(tiny_llama).fingerprint
    code, out, _ = cli("base", "add", "tiny", str(tiny_llama))
    assert code == 0 and out.startswith("tiny -> ")
    assert registry.get("legal@1").base == "tiny"  # earlier versions now name the registered base
    v2 = registry.add("legal", write_adapter(tmp_path / "b"), base="tiny")
    assert v2.base == "tiny" and v2.base_fingerprint == v1.base_fingerprint
    doc = json.loads(cli("base", "list", "--json")[1])
    (b,) = doc["bases"]
    assert (
        b["name"] == "tiny"
        and b["summary"]["model_type"] == "llama"
        and b["summary"]["hidden_size"] == 32
    )
    assert "tiny" in cli("base", "list")[1]


def test_base_reregistration_and_changed_base(registry, tmp_path, tiny_llama):
    from adaptr.tiny import save_tiny_base

    local = tmp_path / "base"
    shutil.copytree(tiny_llama, local)
    registry.add_base("tiny", local)
    other = save_tiny_base(tmp_path / "other", "llama", hidden_size=64)
    with pytest.raises(ConflictError, match="--force"):
        registry.add_base("tiny", other)
    # the folder behind a registered base is replaced by a different model
    shutil.rmtree(local)
    shutil.copytree(other, local)
    with pytest.raises(IntegrityError, match="changed since it was registered"):
        registry.add("x", write_adapter(tmp_path / "x"), base="tiny")
    assert registry.list() == []
    registry.add_base("tiny", local, force=True)
    assert registry.add("x", write_adapter(tmp_path / "y", hidden=64), base="tiny").base == "tiny"


def test_unreachable_hub_base_is_recorded_by_name(registry, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    v = registry.add("x", write_adapter(tmp_path / "x", base="meta-llama/Llama-2-7b-hf"))
    assert v.base == "meta-llama/Llama-2-7b-hf" and v.base_fingerprint is None
    assert any("not available locally" in n for n in v.notes)
