"""Registry capabilities through the Python API and the CLI."""

import json

import pytest

from adaptr.errors import ConflictError, IncompatibleBaseError, InvalidInputError, NotFoundError
from adaptr.registry import Registry

from helpers import write_adapter


def test_add_records_config_files_and_hashes(registry, adapter_dir):
    v = registry.add("legal", adapter_dir, tags=["prod"])
    assert (v.name, v.version, v.ref) == ("legal", 1, "legal@1")
    assert v.peft_type == "LORA" and v.r == 4 and v.lora_alpha == 8
    assert v.target_modules == ["q_proj", "v_proj"]
    assert v.summary["use_dora"] is False and v.summary["lora_modules"] == 4
    assert {f.path for f in v.files} == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "README.md",
    }
    assert v.size == sum((adapter_dir / f.path).stat().st_size for f in v.files)
    assert v.tags == ["prod"]
    assert v.lineage["source"] == str(adapter_dir.resolve())
    for f in v.files:
        blob = registry.blobs.path(f.sha256)
        assert blob.read_bytes() == (adapter_dir / f.path).read_bytes()


def test_versions_are_numbered_and_identical_files_stored_once(registry, adapter_dir):
    assert [registry.add("legal", adapter_dir).version for _ in range(3)] == [1, 2, 3]
    assert len(list(registry.blobs.digests())) == 3  # three files, stored once each
    assert registry.get("legal").version == 3
    assert registry.get("legal@2").version == 2
    assert [v.version for v in registry.list("legal")] == [1, 2, 3]


def test_pickle_files_and_folders_are_skipped(registry, tmp_path):
    src = write_adapter(tmp_path / "out", extra_files={"training_args.bin": "not really a pickle"})
    (src / "checkpoint-10").mkdir()
    v = registry.add("x", src)
    assert "training_args.bin" not in {f.path for f in v.files}
    assert any("training_args.bin" in n for n in v.notes)
    assert any("checkpoint-10" in n for n in v.notes)


def test_tags_move_and_resolve(registry, adapter_dir):
    registry.add("legal", adapter_dir)
    registry.add("legal", adapter_dir)
    registry.tag("legal@1", "prod")
    assert registry.get("legal@prod").version == 1
    registry.tag("legal@2", "prod")
    assert registry.get("legal@prod").version == 2
    assert registry.get("legal@1").tags == []
    registry.untag("legal", "prod")
    with pytest.raises(NotFoundError):
        registry.get("legal@prod")


def test_switch_records_active_adapters_per_base(registry, tmp_path):
    registry.add("a", write_adapter(tmp_path / "a", base="org/base-one"))
    registry.add("b", write_adapter(tmp_path / "b", base="org/base-one"))
    registry.add("c", write_adapter(tmp_path / "c", base="org/base-two"))
    assert registry.switch("a") == ("org/base-one", ["a"])
    registry.switch("c@1")
    assert registry.active() == {"org/base-one": ["a"], "org/base-two": ["c@1"]}
    registry.switch("a", "b")  # stacked
    assert registry.active("org/base-one") == {"org/base-one": ["a", "b"]}
    assert registry.get("b").active and registry.get("c").active is not False
    with pytest.raises(IncompatibleBaseError, match="different bases"):
        registry.switch("a", "c")
    assert registry.active("org/base-one")["org/base-one"] == ["a", "b"]
    registry.deactivate("org/base-one")
    assert registry.active() == {"org/base-two": ["c@1"]}


def test_floating_active_ref_follows_new_versions(registry, adapter_dir):
    registry.add("legal", adapter_dir)
    registry.switch("legal")
    assert registry.get("legal@1").active
    registry.add("legal", adapter_dir)
    assert registry.get("legal@2").active and not registry.get("legal@1").active


def test_rm_needs_force_for_tagged_or_active(registry, adapter_dir):
    registry.add("legal", adapter_dir, tags=["prod"])
    registry.add("legal", adapter_dir)
    registry.switch("legal@2")
    with pytest.raises(ConflictError, match="tagged prod"):
        registry.remove("legal@1")
    with pytest.raises(ConflictError, match="active"):
        registry.remove("legal@2")
    with pytest.raises(InvalidInputError, match="2 versions"):
        registry.remove("legal")
    gone = registry.remove("legal@prod", force=True)
    assert [v.ref for v in gone] == ["legal@1"]
    assert [v.version for v in registry.list("legal")] == [2]
    registry.remove("legal@2", force=True)
    assert registry.active() == {}
    assert registry.list() == []
    # numbers are never reused
    assert registry.add("legal", adapter_dir).version == 3


def test_rm_all_then_gc_frees_files(registry, adapter_dir):
    registry.add("legal", adapter_dir)
    registry.add("legal", adapter_dir)
    assert registry.reclaimable() == 0
    assert len(registry.remove("legal", all_versions=True)) == 2
    assert registry.reclaimable() > 0
    report = registry.gc()
    assert report.blobs_removed == 3
    assert list(registry.blobs.digests()) == []


def test_gc_keeps_shared_blobs(registry, adapter_dir):
    registry.add("a", adapter_dir)
    registry.add("b", adapter_dir)
    registry.remove("a")
    assert registry.gc().blobs_removed == 0
    assert registry.verify().ok


def test_empty_registry_reads_create_nothing(home):
    reg = Registry(home)
    assert reg.list() == [] and reg.active() == {} and reg.bases() == []
    assert reg.verify().ok
    assert not home.exists()


# ------------------------------------------------------------------------ CLI
def test_cli_add_prints_ref_and_list_json(cli, home, adapter_dir):
    code, out, _ = cli("add", "legal", str(adapter_dir), "--tag", "prod")
    assert (code, out.strip()) == (0, "legal@1")
    assert cli("add", "legal", str(adapter_dir))[1].strip() == "legal@2"
    code, out, _ = cli("list", "--json")
    doc = json.loads(out)
    (entry,) = doc["adapters"]
    assert entry["name"] == "legal" and [v["version"] for v in entry["versions"]] == [1, 2]
    assert entry["versions"][0]["tags"] == ["prod"] and entry["versions"][0]["r"] == 4
    code, out, _ = cli("list")
    assert code == 0 and "legal" in out and "prod" in out


def test_cli_show_tag_switch_rm(cli, home, adapter_dir):
    cli("add", "legal", str(adapter_dir), "--base", "org/llama")
    code, out, _ = cli("show", "legal", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ref"] == "legal@1" and doc["base"] == "org/llama"
    assert {f["path"] for f in doc["files"]} >= {"adapter_config.json", "adapter_model.safetensors"}
    assert all(len(f["sha256"]) == 64 for f in doc["files"])
    code, out, _ = cli("show", "legal", "--wide")
    assert code == 0 and "q_proj" in out and doc["files"][0]["sha256"] in out
    assert cli("tag", "legal@1", "prod")[1].strip() == "legal@prod -> legal@1"
    code, out, _ = cli("switch", "legal@prod")
    assert code == 0 and "org/llama: active legal@prod" in out
    assert json.loads(cli("list", "--json")[1])["active"] == {"org/llama": ["legal@prod"]}
    code, _, err = cli("rm", "legal@1")
    assert code != 0 and err.startswith("error: legal@1 is tagged prod and active")
    code, out, err = cli("rm", "legal@1", "--force")
    assert code == 0 and "removed legal@1" in out and "adaptr gc" in err
    assert cli("gc")[0] == 0
    assert json.loads(cli("list", "--json")[1]) == {"adapters": [], "active": {}}


def test_cli_tag_delete_and_switch_clear(cli, home, adapter_dir):
    cli("add", "legal", str(adapter_dir), "--base", "org/llama")
    cli("tag", "legal", "prod")
    assert cli("tag", "legal", "prod", "--delete")[0] == 0
    assert json.loads(cli("show", "legal", "--json")[1])["tags"] == []
    cli("switch", "legal")
    assert cli("switch", "--clear", "org/llama")[0] == 0
    assert json.loads(cli("list", "--json")[1])["active"] == {}


def test_cli_verify_and_home_option(cli, tmp_path, adapter_dir):
    other = tmp_path / "elsewhere"
    assert cli("add", "x", str(adapter_dir), "--home", str(other))[0] == 0
    doc = json.loads(cli("--home", str(other), "list", "--json")[1])
    assert [a["name"] for a in doc["adapters"]] == ["x"]
    assert cli("list", "--json")[1].count('"name"') == 0  # $ADAPTR_HOME is untouched
    code, out, _ = cli("verify", "--home", str(other))
    assert code == 0 and out.startswith("ok: 1 version(s), 3 file(s)")
    doc = json.loads(cli("verify", "x@1", "--json", "--home", str(other))[1])
    assert doc["ok"] and doc["files"] == 3


def test_only_writes_that_store_something_create_a_registry_home(tmp_path, cli):
    home = tmp_path / "typo"
    for args in (("tag", "x@1", "t"), ("switch", "x"), ("rm", "x@1"), ("gc",)):
        code, _, err = cli("--home", str(home), *args)
        assert code == 3 and f"no registry at {home.resolve()}" in err, (args, err)
    assert cli("--home", str(home), "list")[0] == 0
    assert cli("--home", str(home), "verify")[0] == 3  # "ok: 0 versions" would hide the typo
    assert not home.exists()  # nothing above made it
    code, out, err = cli("--home", str(home), "add", "x", str(write_adapter(tmp_path / "x")))
    assert code == 0 and out.strip() == "x@1"
    assert f"note: created a new registry at {home.resolve()}" in err


def test_list_without_lineage_keeps_everything_else(registry, tmp_path):
    registry.add("a", write_adapter(tmp_path / "a"), lineage={"log_history": [{"loss": 1.0}]})
    full, light = registry.list(), registry.list(lineage=False)
    assert full[0].lineage["log_history"] == [{"loss": 1.0}] and light[0].lineage == {}
    for f, g in zip(full, light, strict=True):
        assert (f.ref, f.files, f.tags, f.active, f.config) == (
            g.ref,
            g.files,
            g.tags,
            g.active,
            g.config,
        )
