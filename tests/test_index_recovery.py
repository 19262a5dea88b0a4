"""registry.index: a lost, emptied or damaged index never lets gc wipe the store, reindex brings
it back; a half-created or newer index reads as empty or is refused."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from adaptr.errors import IncompatibleBaseError, IntegrityError, InvalidAdapterError
from adaptr.registry import Registry

from helpers import run_adaptr, write_adapter


def _populate(home: Path, tmp_path: Path) -> Registry:
    reg = Registry(home)
    reg.add("alpha", write_adapter(tmp_path / "a1", seed=1), tags=["prod"])
    reg.add("alpha", write_adapter(tmp_path / "a2", seed=2))
    reg.add("beta", write_adapter(tmp_path / "b1", seed=3))
    reg.add("gone", write_adapter(tmp_path / "g1", seed=4))
    reg.remove("gone@1")  # its number must never be reused after a rebuild
    reg.switch("alpha@prod")
    return reg


def _state(reg: Registry) -> dict:
    return {
        "versions": sorted((v.ref, tuple(f.sha256 for f in v.files)) for v in reg.list()),
        "tags": sorted((v.ref, tuple(v.tags)) for v in reg.list()),
        "active": reg.active(),
    }


def _blobs(home: Path) -> set[str]:
    return {p.name for p in (home / "blobs").rglob("*") if p.is_file()}


def _truncate(db: Path) -> None:
    db.write_bytes(b"")
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _delete(db: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)


def _garbage(db: Path) -> None:
    _delete(db)
    db.write_bytes(b"this is not a database" * 100)


@pytest.mark.parametrize(
    "damage", [_truncate, _delete, _garbage], ids=["emptied", "deleted", "garbage"]
)
def test_a_lost_index_blocks_gc_and_reindex_restores_everything(home, tmp_path, cli, damage):
    reg = _populate(home, tmp_path)
    before, blobs = _state(reg), _blobs(home)
    reg.close()  # as when no adaptr process runs while the file is damaged
    damage(home / "registry.db")

    code, out, err = cli("gc")
    assert code == 6 and "reindex" in err and err.count("\n") == 1, err
    assert _blobs(home) == blobs  # nothing deleted
    code, _, err = cli("verify")
    assert code == 6 and "reindex" in err
    code, out, err = cli("list")
    assert code == 6 and "reindex" in err and "no adapters yet" not in out
    code, _, err = cli("add", "alpha", str(write_adapter(tmp_path / "a3", seed=9)))
    assert code == 6 and "reindex" in err  # a write would start a fresh, smaller index
    code, _, err = cli("tag", "alpha@1", "t", "--require", "loss<=9")
    assert code == 6 and "reindex" in err  # (a gated tag too, before it reads the evals)
    same = Registry(home)
    with pytest.raises(IntegrityError, match="reindex"):
        same.gc()
    with pytest.raises(IntegrityError, match="reindex"):  # refused again, not a closed handle
        same.list()

    code, out, err = cli("reindex")
    assert code == 0 and "3 version(s), 1 tag(s)" in out, (out, err)
    reg = Registry(home)
    assert _state(reg) == before
    assert reg.verify().ok
    assert reg.add("gone", write_adapter(tmp_path / "g2", seed=5)).version == 2  # not 1 again
    reg.gc()
    assert _blobs(home) >= {f.sha256 for v in reg.list() for f in v.files}
    if damage is not _delete:
        assert list(home.glob("registry.db.old-*")), "the damaged index is kept, not deleted"


def test_gc_after_removing_everything_still_frees_the_files(registry, tmp_path):
    registry.add("only", write_adapter(tmp_path / "o", seed=1))
    registry.remove("only@1")
    report = registry.gc()  # a real, empty registry: names remain, so the index is trusted
    assert report.blobs_removed == 2 and not _blobs(registry.home)


def test_versions_the_index_lost_are_reported_kept_by_gc_and_restored(registry, tmp_path, cli):
    registry.add("keep", write_adapter(tmp_path / "k", seed=1))
    registry.add("lost", write_adapter(tmp_path / "l", seed=2))
    lost_files = {f.sha256 for f in registry.get("lost@1").files}
    conn = sqlite3.connect(registry.home / "registry.db")  # an index that lost one row
    conn.execute("DELETE FROM versions WHERE name='lost'")
    conn.commit()
    conn.close()

    code, _, err = cli("verify")
    assert code == 6 and "lost@1" in err and "missing from the index" in err
    code, _, err = cli("gc")
    assert code == 0 and "lost@1" in err
    assert lost_files <= _blobs(registry.home)
    assert cli("reindex")[0] == 0
    assert Registry(registry.home).get("lost@1").files


def test_a_registry_made_before_manifests_gets_them_on_its_next_write(registry, tmp_path):
    registry.add("old", write_adapter(tmp_path / "o", seed=1), tags=["prod"])
    shutil.rmtree(registry.home / "manifests")
    (registry.home / "state.json").unlink()
    assert "no version manifests yet" in " ".join(registry.verify().notes)
    registry.tag("old@1", "stable")  # any write backfills
    manifest = json.loads((registry.home / "manifests" / "old" / "1.json").read_text())
    assert manifest["files"] == [
        {"path": f.path, "sha256": f.sha256, "size": f.size} for f in registry.get("old@1").files
    ]
    assert registry.verify().ok and not registry.verify().notes


def test_an_interrupted_add_or_remove_is_settled_by_the_next_writer(registry, tmp_path):
    v = registry.add("x", write_adapter(tmp_path / "x", seed=1))
    journal = registry.journal
    # an add killed after its manifest, before its commit: never happened
    journal.begin_add({**json.loads(journal.committed("x", 1).read_text()), "version": 2})
    # a remove killed after moving the manifest aside, before its commit: did not happen
    moved = journal.begin_remove("x", 1)
    assert moved is not None and not journal.committed("x", 1).exists()
    assert registry.verify().ok  # intents are not problems
    registry.tag(v.ref, "t")
    assert journal.committed("x", 1).exists() and not journal.committed("x", 2).exists()
    assert not any((registry.home / "manifests").glob("_*/*.json"))


def test_a_folder_changed_during_add_is_refused_and_nothing_is_stored(
    registry, tmp_path, monkeypatch
):
    src = write_adapter(tmp_path / "src", r=4, seed=1)
    other = write_adapter(tmp_path / "other", r=8, seed=2)
    real_stage = registry.blobs.stage

    def swap_then_stage(f, dest):  # another process saves a rank-8 adapter into the folder
        if f.name == "adapter_model.safetensors":
            shutil.copy(other / f.name, f)
        return real_stage(f, dest)

    monkeypatch.setattr(registry.blobs, "stage", swap_then_stage)
    with pytest.raises(InvalidAdapterError, match="changed while it was being added"):
        registry.add("racy", src)
    assert registry.list() == [] and not _blobs(registry.home)
    assert not any((registry.home / "tmp").iterdir())


def _swapper(folder: str, a: str, b: str, stop) -> None:
    """Keep replacing the adapter files in ``folder`` with those of ``a`` or ``b``."""
    i = 0
    while not stop.is_set():
        src = Path(a if i % 2 else b)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tmp = Path(folder) / f".{name}.swap"
            shutil.copy(src / name, tmp)
            os.replace(tmp, Path(folder) / name)
        i += 1


def test_adds_racing_a_process_that_swaps_the_folder_store_only_consistent_versions(
    registry, tmp_path
):
    a = write_adapter(tmp_path / "r4", r=4, seed=1)
    b = write_adapter(tmp_path / "r8", r=8, seed=2)
    folder = tmp_path / "live"
    shutil.copytree(a, folder)
    stop = multiprocessing.get_context("spawn").Event()
    proc = multiprocessing.get_context("spawn").Process(
        target=_swapper, args=(str(folder), str(a), str(b), stop)
    )
    proc.start()
    stored = refused = 0
    try:
        for _ in range(60):
            try:
                registry.add("live", folder)
                stored += 1
            except InvalidAdapterError:
                refused += 1
    finally:
        stop.set()
        proc.join(timeout=60)
    assert stored + refused == 60
    from adaptr.registry.adapter_dir import inspect_adapter

    for v in registry.list():  # every stored version is one whole adapter, config and weights
        out = registry.export(v.ref, tmp_path / "check", force=True)
        assert inspect_adapter(out).config["r"] == v.r
    assert registry.verify().ok


def test_a_name_keeps_one_base(registry, tmp_path, cli):
    registry.add("drift", write_adapter(tmp_path / "d1", seed=1), base="base-a")
    registry.switch("drift")
    with pytest.raises(IncompatibleBaseError, match="a name keeps one base"):
        registry.add("drift", write_adapter(tmp_path / "d2", seed=2), base="base-b")
    code, _, err = cli(
        "add", "drift", str(write_adapter(tmp_path / "d3", seed=3)), "--base", "base-b"
    )
    assert code == 4 and "drift holds versions on base base-a" in err and err.count("\n") == 1
    assert [v.ref for v in registry.list("drift")] == ["drift@1"]
    assert registry.add("drift", write_adapter(tmp_path / "d4", seed=4), base="base-a").version == 2
    assert registry.active() == {"base-a": ["drift"]}


def _verify_loop(home: str, rounds: int, out) -> None:
    reg = Registry(home)
    out.put([p for _ in range(rounds) for p in reg.verify().problems])


def test_verify_beside_concurrent_rm_and_gc_reports_no_false_problems(registry, tmp_path):
    for i in range(6):
        registry.add("keep", write_adapter(tmp_path / f"k{i}", seed=i))
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_verify_loop, args=(str(registry.home), 40, results))
    proc.start()
    n = 0
    while proc.is_alive() and n < 400:  # churn until the verifier is done (bounded)
        src = write_adapter(tmp_path / f"churn{n % 3}", seed=1000 + n)
        v = registry.add("churn", src)
        registry.remove(v.ref)
        registry.gc()
        n += 1
    problems = results.get(timeout=300)
    proc.join(timeout=60)
    assert problems == [], problems[:5]
    assert n > 0


def test_a_registry_whose_first_write_died_reads_as_empty(home, adapter_dir):
    """A writer killed while creating the schema leaves a database file without tables."""
    import sqlite3

    home.mkdir(parents=True)
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.close()
    reg = Registry(home)
    assert reg.list() == [] and reg.active() == {} and reg.verify().ok
    r = run_adaptr("list", "--json", home=home)
    assert r.returncode == 0 and json.loads(r.stdout) == {"adapters": [], "active": {}}
    assert reg.add("a", adapter_dir).version == 1 and [v.ref for v in Registry(home).list()] == [
        "a@1"
    ]


def test_a_registry_from_a_newer_adaptr_is_refused(home, adapter_dir):
    import sqlite3

    Registry(home).add("a", adapter_dir)
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    r = run_adaptr("list", home=home)
    assert r.returncode != 0 and r.stderr.strip().endswith(
        "was written by a newer adaptr (schema 99); upgrade adaptr to read it"
    )
