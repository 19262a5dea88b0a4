"""Base models: registration, fingerprints and refusing the wrong base."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from adaptr.errors import (
    ConflictError,
    IntegrityError,
    InvalidInputError,
    NotFoundError,
)
from adaptr.registry import Registry
from adaptr.registry.fingerprint import find_base_dir, read_base

from helpers import refused, snapshot, write_adapter


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


# ------------------------------------------------------- bases that do not fit
@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    from adaptr.tiny import save_tiny_base

    return save_tiny_base(tmp_path_factory.mktemp("wide") / "wide-llama", "llama", hidden_size=48)


def test_generate_and_merge_with_a_base_that_does_not_fit(
    cli, home, tmp_path, tiny_llama, wide_llama
):
    assert cli("add", "p0", str(write_adapter(tmp_path / "p0")), "--base", str(tiny_llama))[0] == 0
    before = snapshot(home)
    want = f"p0@1 does not fit base {wide_llama}: model.layers.0.self_attn.q_proj is [48, 48] in the base"
    out = tmp_path / "merged"
    for command in (
        ("generate", "p0", "hello", "--base", str(wide_llama)),
        ("merge", "p0", "--out", str(out), "--base", str(wide_llama)),
        ("compose", "p0", "--name", "c", "--base", str(wide_llama)),  # checked on the loaded model
    ):
        refused(cli, home, before, *command, match=want)
    assert not out.exists()

    from adaptr import bases, inference
    from adaptr.errors import IncompatibleBaseError
    from adaptr.merge import merge

    registry = Registry(home)
    with pytest.raises(IncompatibleBaseError, match=re.escape(want)):
        inference.load(registry, ["p0"], base=str(wide_llama))
    with pytest.raises(IncompatibleBaseError, match=re.escape(want)):
        merge(registry, ["p0"], out, base=str(wide_llama))
    model, _ = bases.load_base_model(str(wide_llama))
    with pytest.raises(IncompatibleBaseError, match="p0@1 does not fit base"):
        inference.attach(model, registry, [registry.get("p0")], tmp_path / "work")
    assert snapshot(home) == before


def test_a_typo_of_a_registered_base_is_refused(cli, home, tmp_path, tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert cli("base", "add", "tiny-llama", str(tiny_llama))[0] == 0
    before = snapshot(home)
    src = write_adapter(tmp_path / "src")
    refused(cli, home, before, "add", "p0", str(src), "--base", "tiny-lama",
            match="unknown base 'tiny-lama': did you mean 'tiny-llama'?")  # fmt: skip
    refused(cli, home, before, "add", "p0", str(src), "--base", "Tiny-Llama",
            match="did you mean 'tiny-llama'?")  # fmt: skip
    with pytest.raises(NotFoundError, match="did you mean 'tiny-llama'"):
        Registry(home).add("p0", src, base="tiny-lama")
    assert snapshot(home) == before
    # nothing close: still a Hub id recorded by name, and the note says so
    code, out, err = cli("add", "p0", str(src), "--base", "org/other-model")
    assert code == 0 and out.strip() == "p0@1", err
    assert (
        "base 'org/other-model' is not registered, not a local folder and not in the Hugging Face cache"
        in err
    )
    assert "recorded as a Hub id by name" in err
    assert Registry(home).get("p0").base == "org/other-model"


@pytest.mark.parametrize(
    "kind, match",
    [
        ("deep-config", "config.json is nested too deeply to be a model config"),
        ("deep-index", "model.safetensors.index.json is nested too deeply to be a weights index"),
        ("number-shard", "names shard 5, which is not a file in"),
        ("escaping-shard", "names shard '/etc/passwd', which is not a file in"),
        ("folder-shard", "names shard '.', which is not a file in"),
    ],
)
def test_hostile_base_folders(cli, home, tmp_path, populated, tiny_llama, kind, match):
    base = tmp_path / kind
    shutil.copytree(tiny_llama, base)
    deep = "[" * 100_000 + "]" * 100_000
    index = base / "model.safetensors.index.json"
    if kind == "deep-config":
        (base / "config.json").write_text(deep)
    elif kind == "deep-index":
        index.write_text(deep)
    else:
        shard = {"number-shard": 5, "escaping-shard": "/etc/passwd", "folder-shard": "."}[kind]
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    refused(cli, home, populated, "base", "add", "b", str(base), match=match)
    src = write_adapter(tmp_path / "src")
    refused(cli, home, populated, "add", "p0", str(src), "--base", str(base), match=match)
    with pytest.raises(InvalidInputError, match=re.escape(match)):
        Registry(home).add_base("b", base)


def test_the_context_window_is_not_enforced_past_what_rope_scaling_allows():
    from transformers import LlamaConfig

    from adaptr.bases import context_window

    assert context_window(LlamaConfig(max_position_embeddings=512)) == 512
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}
    assert context_window(LlamaConfig(max_position_embeddings=512, rope_scaling=yarn)) is None
