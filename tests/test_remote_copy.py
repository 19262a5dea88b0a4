"""``adaptr copy`` between a local home and a store: versions with lineage, tags, evals and
bases; idempotent (a second run copies nothing) and resumable (a partial copy finishes)."""

from __future__ import annotations

import json

from adaptr.registry import Registry
from adaptr.registry.remote.remote import RemoteRegistry

import remote_helpers
from helpers import run_adaptr, write_adapter

seaweed, s3_home = remote_helpers.seaweed, remote_helpers.s3_home  # the fixtures


def _local(tmp_path, tiny_llama) -> Registry:
    reg = Registry(tmp_path / "laptop")
    reg.add_base("tiny", tiny_llama)
    for seed in (1, 2, 3):
        reg.add("foo", write_adapter(tmp_path / f"s{seed}", seed=seed), base="tiny",
                lineage={"dataset": f"d{seed}"})  # fmt: skip
    reg.add("bar", write_adapter(tmp_path / "b", seed=9), base="tiny", tags=["prod"])
    reg.remove("foo@2")
    reg.tag("foo@3", "prod")
    reg.add_evals([("foo@3", {"metrics": {"loss": 0.5}, "data_sha256": "a" * 64})])
    return reg


def test_copy_local_to_store_and_back_keeps_numbers_tags_evals_lineage(
    s3_home, tmp_path, tiny_llama
):
    local = _local(tmp_path, tiny_llama)
    env = s3_home.env()
    r = run_adaptr("copy", str(local.home), s3_home.url, "foo", env=env)  # resumable: part first
    assert r.returncode == 0, r.stderr
    r = run_adaptr("copy", str(local.home), s3_home.url, "--json", env=env)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["copied"] == ["bar@1"] and sorted(doc["skipped"]) == ["foo@1", "foo@3"]
    remote = RemoteRegistry(s3_home.url, cache=tmp_path / "other")
    assert [v.ref for v in remote.list()] == ["bar@1", "foo@1", "foo@3"]
    assert remote.get("foo@prod").version == 3 and remote.get("bar@prod").version == 1
    assert remote.get("foo@3").lineage["dataset"] == "d3"
    assert [e["metrics"] for e in remote.evals("foo@3")] == [{"loss": 0.5}]
    assert [b.name for b in remote.bases()] == ["tiny"]  # the fingerprint, no path
    again = json.loads(run_adaptr("copy", str(local.home), s3_home.url, "--json", env=env).stdout)
    assert again["copied"] == [] and again["tags"] == [] and again["evals"] == 0  # idempotent
    r = run_adaptr("copy", s3_home.url, str(tmp_path / "server"), env=env)
    assert r.returncode == 0, r.stderr
    back = Registry(tmp_path / "server")
    assert [v.ref for v in back.list()] == ["bar@1", "foo@1", "foo@3"] and back.verify().ok
    assert back.get("foo@prod").version == 3 and len(back.evals("foo@3")) == 1
    out = back.export("foo@3", tmp_path / "exp")
    assert (out / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "s3" / "adapter_model.safetensors"
    ).read_bytes()


def test_copy_into_a_taken_number_renumbers_and_says_so(s3_home, tmp_path, tiny_llama):
    local = _local(tmp_path, tiny_llama)
    remote = Registry(s3_home.url)
    remote.add("foo", write_adapter(tmp_path / "theirs", seed=42))  # foo@1 there is another
    doc = json.loads(run_adaptr("copy", str(local.home), s3_home.url, "foo", "--json",
                                env=s3_home.env()).stdout)  # fmt: skip
    assert doc["copied"] == ["foo@1->foo@2", "foo@3"]
    remote.sync()
    assert remote.get("foo@prod").version == 3 and len(remote.list("foo")) == 3
