"""The registry on a real S3 store (SeaweedFS, started by the ``seaweed`` fixture): every
command on an s3:// home, the replica on a second "machine" (another cache), CAS tags,
tombstones, the verified blob cache, unreachable stores and wrong credentials."""

from __future__ import annotations

import json
import os

import pytest

from adaptr.errors import ConflictError, IntegrityError
from adaptr.registry import Registry

import remote_helpers
from helpers import run_adaptr, write_adapter
from remote_helpers import SECRET, Proxy, S3Home

seaweed, s3_home = remote_helpers.seaweed, remote_helpers.s3_home  # the fixtures


def _raw_store(home: S3Home):
    from adaptr.registry.remote.store import Location, ObjectStore

    return ObjectStore(Location.parse(home.url))


def test_registry_of_an_s3_home_is_remote_and_lists_across_machines(s3_home, tmp_path):
    from adaptr.registry.remote.remote import RemoteRegistry

    a = Registry(s3_home.url)
    assert isinstance(a, RemoteRegistry) and a.url == s3_home.url
    v1 = a.add("foo", write_adapter(tmp_path / "a1", seed=1), tags=["prod"])
    v2 = a.add("foo", write_adapter(tmp_path / "a2", seed=2))
    assert (v1.ref, v2.ref) == ("foo@1", "foo@2") and v1.tags == ["prod"]
    b = RemoteRegistry(s3_home.url, cache=tmp_path / "machine-b")
    assert [v.ref for v in b.list()] == ["foo@1", "foo@2"]
    assert b.get("foo@prod").version == 1
    assert b.blobs.downloaded == 0  # listing fetches manifests, never weights
    out = b.export("foo@prod", tmp_path / "out")
    assert (out / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "a1" / "adapter_model.safetensors"
    ).read_bytes()
    # the replica folder opens the same store (what vLLM's processes get as ADAPTR_HOME)
    again = Registry(b.home)
    assert isinstance(again, RemoteRegistry) and again.url == s3_home.url


def test_cli_commands_on_an_s3_home(s3_home, tmp_path):
    env = s3_home.env()
    src = write_adapter(tmp_path / "a1", seed=1)
    r = run_adaptr("add", "foo", str(src), "--tag", "prod", env=env)
    assert r.returncode == 0 and r.stdout.strip() == "foo@1", r.stderr
    assert (
        run_adaptr("add", "foo", str(write_adapter(tmp_path / "a2", seed=2)), env=env).returncode
        == 0
    )
    other = s3_home.env(cache=tmp_path / "b")
    for args in (
        ("tag", "foo@2", "prod"),
        ("switch", "foo@prod"),
        ("show", "foo@prod", "--json"),
        ("list", "--json"),
        ("verify",),
        ("export", "foo@1", str(tmp_path / "exp")),
    ):
        r = run_adaptr(*args, env=other)
        assert r.returncode == 0, (args, r.stderr)
    listed = json.loads(run_adaptr("list", "--json", env=env).stdout)
    versions = listed["adapters"][0]["versions"]
    assert [v["tags"] for v in versions] == [[], ["prod"]]
    assert listed["active"] == {"": ["foo@prod"]}
    r = run_adaptr("rm", "foo@2", env=env)
    assert r.returncode != 0 and "tagged prod and active" in r.stderr  # held: needs --force
    assert run_adaptr("rm", "foo@2", "--force", env=env).returncode == 0
    r = run_adaptr("add", "foo", str(write_adapter(tmp_path / "a3", seed=3)), env=other)
    assert r.stdout.strip() == "foo@3", r.stderr  # a removed number is never given again
    assert "foo@2" not in run_adaptr("list", "--json", env=env).stdout
    r = run_adaptr("show", "foo@prod", env=env)
    assert r.returncode != 0 and r.stderr.startswith("error: ")  # the tag went with foo@2


def test_tag_moves_are_compare_and_swap(s3_home, tmp_path, monkeypatch):
    from adaptr.registry.remote.remote import RemoteRegistry

    monkeypatch.setenv("ADAPTR_REMOTE_TTL", "3600")  # each keeps what it read
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    for seed in (1, 2, 3):
        a.add("foo", write_adapter(tmp_path / f"s{seed}", seed=seed))
    a.tag("foo@1", "prod")
    b = RemoteRegistry(s3_home.url, cache=tmp_path / "b")
    assert b.get("foo@prod").version == 1  # b read the tag on foo@1
    a.tag("foo@2", "prod")
    with pytest.raises(ConflictError, match=r"foo@prod was moved by another writer .*foo@2"):
        b.tag("foo@3", "prod")  # b's view is stale: refused, not overwritten
    assert RemoteRegistry(s3_home.url, cache=tmp_path / "c").get("foo@prod").version == 2
    assert b.tag("foo@3", "prod").version == 3  # after the refusal b knows where it is now


def test_unbound_base_and_fingerprints_per_machine(s3_home, tmp_path, tiny_llama):
    import shutil

    from adaptr.errors import NotFoundError
    from adaptr.registry.remote.remote import RemoteRegistry

    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    a.add_base("tiny", tiny_llama)
    v = a.add("foo", write_adapter(tmp_path / "s", seed=1), base="tiny")
    assert v.base == "tiny" and v.base_fingerprint
    assert str(tiny_llama) not in json.dumps(_manifests(s3_home))  # no local path on the store
    b = RemoteRegistry(s3_home.url, cache=tmp_path / "b")
    assert [x.path for x in b.bases()] == [""]  # known, not bound here
    with pytest.raises(NotFoundError, match="not bound on this machine"):
        b.base_path("tiny")
    copy = tmp_path / "machine-b-models" / "tiny"
    shutil.copytree(tiny_llama, copy)
    assert b.add_base("tiny", copy).path == str(copy)  # same fingerprint elsewhere: fine
    assert b.base_path("tiny") == str(copy)
    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = cfg["num_hidden_layers"] + 1
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConflictError) as e:
        b.add_base("tiny", other)
    fp_store, fp_other = v.base_fingerprint, _fp(other)
    assert fp_store[:12] in str(e.value) and fp_other[:12] in str(e.value)


def _fp(path):
    from adaptr.registry.fingerprint import read_base

    return read_base(path).fingerprint


def _manifests(home: S3Home) -> list[dict]:
    store = _raw_store(home)
    return [json.loads(store.get(m.key)[0]) for m in store.list("versions/")]


def test_a_corrupt_or_swapped_object_is_refused_never_served(s3_home, tmp_path):
    from adaptr.registry.remote.remote import RemoteRegistry

    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    v1 = a.add("foo", write_adapter(tmp_path / "s1", seed=1))
    v2 = a.add("foo", write_adapter(tmp_path / "s2", seed=2))
    store = _raw_store(s3_home)
    w1 = next(f.sha256 for f in v1.files if f.path == "adapter_model.safetensors")
    w2 = next(f.sha256 for f in v2.files if f.path == "adapter_model.safetensors")
    data = bytearray(store.get(f"blobs/sha256/{w1}")[0])
    data[-1] ^= 1
    store.put(f"blobs/sha256/{w1}", bytes(data))  # a flipped bit
    store.put(f"blobs/sha256/{w2}", store.get(f"blobs/sha256/{a.get('foo@1').files[0].sha256}")[0])
    b = RemoteRegistry(s3_home.url, cache=tmp_path / "b")
    for ref in ("foo@1", "foo@2"):
        v = b.get(ref)
        with pytest.raises(IntegrityError, match="corrupt on the store"):
            b.read_checked(v, "adapter_model.safetensors")
        with pytest.raises(IntegrityError):
            b.export(ref, tmp_path / f"out-{ref}")
        with pytest.raises(IntegrityError):
            b.check_files(v)
    assert not b.blobs.local(w1).exists() and not b.blobs.local(w2).exists()  # never cached
    assert not b.verify().ok
    r = run_adaptr(
        "export", "foo@1", str(tmp_path / "cli-out"), env=s3_home.env(cache=tmp_path / "c")
    )
    assert r.returncode == 6 and r.stderr.count("\n") == 1 and "corrupt" in r.stderr


def test_a_re_add_repairs_a_corrupt_object_on_the_store(s3_home, tmp_path):
    from adaptr.registry.remote.remote import RemoteRegistry

    src = write_adapter(tmp_path / "s1", seed=1)
    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    v1 = a.add("foo", src)
    store = _raw_store(s3_home)
    w1 = next(f.sha256 for f in v1.files if f.path == "adapter_model.safetensors")
    data = bytearray(store.get(f"blobs/sha256/{w1}")[0])
    data[-1] ^= 1
    store.put(f"blobs/sha256/{w1}", bytes(data))  # a flipped bit, the same size
    assert not RemoteRegistry(s3_home.url, cache=tmp_path / "b").verify().ok
    RemoteRegistry(s3_home.url, cache=tmp_path / "c").add("foo", src)  # the intact source again
    b = RemoteRegistry(s3_home.url, cache=tmp_path / "d")
    assert b.verify().ok, b.verify().problems
    assert (
        b.read_checked(b.get("foo@1"), "adapter_model.safetensors")
        == (src / "adapter_model.safetensors").read_bytes()
    )


def test_a_corrupt_cached_file_is_fetched_again(s3_home, tmp_path):
    from adaptr.registry.remote.remote import RemoteRegistry

    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    v = a.add("foo", write_adapter(tmp_path / "s1", seed=1))
    w = next(f.sha256 for f in v.files if f.path == "adapter_model.safetensors")
    path = a.blobs.local(w)
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[10] ^= 1
    path.write_bytes(bytes(data))
    fresh = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    good = (tmp_path / "s1" / "adapter_model.safetensors").read_bytes()
    assert fresh.read_checked(fresh.get("foo@1"), "adapter_model.safetensors") == good


def test_unreachable_store_serves_the_cache_and_writes_fail_in_one_line(s3_home, tmp_path):
    proxy = Proxy(s3_home.server.endpoint)  # the store's address, for as long as it runs
    warm = s3_home.env(AWS_ENDPOINT_URL=proxy.endpoint, ADAPTR_REMOTE_RETRIES="0")
    src = write_adapter(tmp_path / "s1", seed=1)
    assert run_adaptr("add", "foo", str(src), "--tag", "prod", env=warm).returncode == 0
    assert run_adaptr("export", "foo@prod", str(tmp_path / "e0"), env=warm).returncode == 0
    proxy.stop()
    gone = warm
    r = run_adaptr("list", env=gone)
    assert r.returncode == 0 and "foo" in r.stdout and "cannot be reached" in r.stderr
    r = run_adaptr("export", "foo@prod", str(tmp_path / "e1"), env=gone)
    assert r.returncode == 0, r.stderr  # a cached version keeps working
    for args in (("add", "foo", str(src)), ("tag", "foo@1", "x"), ("rm", "foo@1", "--force")):
        r = run_adaptr(*args, env=gone)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1, (args, r.stderr)
        assert lines[0].startswith("error: ") and s3_home.url in lines[0], lines
        assert "cannot be reached" in lines[0]
    cold = {**gone, "ADAPTR_CACHE": str(tmp_path / "cold")}
    r = run_adaptr("list", env=cold)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "cannot be reached" in r.stderr


def test_wrong_credentials_are_one_line_and_never_echo_the_secret(s3_home, tmp_path):
    wrong = "WRONG-secret-value-123"
    env = s3_home.env(AWS_SECRET_ACCESS_KEY=wrong)
    for args in (
        ("list",),
        ("--debug", "list"),
        ("add", "foo", str(write_adapter(tmp_path / "s"))),
    ):
        r = run_adaptr(*args, env=env)
        assert r.returncode != 0
        text = r.stdout + r.stderr
        assert wrong not in text and SECRET not in text
        if "--debug" not in args:
            assert r.stderr.count("\n") == 1 and "refused the credentials" in r.stderr, r.stderr
    good = Registry(s3_home.url)
    good.add("foo", write_adapter(tmp_path / "ok"))
    blob = json.dumps([m for m in _manifests(s3_home)]) + (s3_home.cache / "x").parent.as_posix()
    assert SECRET not in blob
    for p in s3_home.cache.rglob("*"):
        if p.is_file() and p.suffix in (".json", ".db", ""):
            assert SECRET.encode() not in p.read_bytes(), p


def test_profile_credentials(s3_home, tmp_path, monkeypatch):
    key, secret = os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"]
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    creds = tmp_path / "credentials"
    creds.write_text(f"[team]\naws_access_key_id = {key}\naws_secret_access_key = {secret}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "team")
    reg = Registry(s3_home.url)
    assert reg.add("foo", write_adapter(tmp_path / "s")).ref == "foo@1"


def test_evals_are_stored_on_the_store(s3_home, tmp_path):
    from adaptr.registry.remote.remote import RemoteRegistry

    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    a.add("foo", write_adapter(tmp_path / "s"))
    a.add_evals([("foo@1", {"metrics": {"loss": 1.5}, "data_sha256": "x" * 64})])
    b = RemoteRegistry(s3_home.url, cache=tmp_path / "b")
    (rec,) = b.evals("foo@1")
    assert rec["metrics"] == {"loss": 1.5} and rec["ref"] == "foo@1"


def test_reindex_rebuilds_the_replica_from_the_store(s3_home, tmp_path):
    reg = Registry(s3_home.url)
    reg.add("foo", write_adapter(tmp_path / "s1", seed=1), tags=["prod"])
    (reg.home / "registry.db").unlink()
    report = Registry(s3_home.url).reindex()
    assert (report.versions, report.tags) == (1, 1)
    assert Registry(s3_home.url).get("foo@prod").version == 1


def test_missing_bucket_and_bad_address_are_one_line(s3_home, tmp_path):
    r = run_adaptr("list", env={**s3_home.env(), "ADAPTR_HOME": "s3://no-such-bucket-x/p"})
    assert r.returncode != 0 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    r = run_adaptr("list", env={**s3_home.env(), "ADAPTR_HOME": "s3://A_B/p"})
    assert r.returncode == 2 and "invalid store address" in r.stderr


def test_a_gated_move_on_the_store_never_overwrites_a_move_made_meanwhile(
    s3_home, tmp_path, monkeypatch
):
    import adaptr.evaluation.gates as ev
    from adaptr.errors import ConflictError
    from adaptr.registry.remote.remote import RemoteRegistry

    a = RemoteRegistry(s3_home.url, cache=tmp_path / "a")
    for seed in range(3):
        a.add("m", write_adapter(tmp_path / f"s{seed}", seed=seed))
    a.tag("m@1", "prod")

    def gate_passes_while_another_machine_moves_the_tag(*args, **kwargs):
        RemoteRegistry(s3_home.url, cache=tmp_path / "b").tag("m@2", "prod")
        return ["loss: passed"]

    monkeypatch.setattr(ev, "check_gate", gate_passes_while_another_machine_moves_the_tag)
    monkeypatch.setenv("ADAPTR_REMOTE_TTL", "0")  # a's next read syncs: the CAS alone would pass
    with pytest.raises(ConflictError):
        ev.promote(a, "m@3", "prod", better_than="prod")
    assert RemoteRegistry(s3_home.url, cache=tmp_path / "c").get("m@prod").version == 2
