"""registry/recovery.py and the journal it reads: reindex beside a live registry, damaged
manifests and state, lost file rows, version numbers that are never given out twice."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptr.errors import IntegrityError, NotFoundError
from adaptr.registry import Registry

from helpers import refused, snapshot, write_adapter

# A second process holding a Registry open the way `adaptr train` (plan, then add) and
# `adaptr serve` (one object answering every request) do, driven line by line.
WORKER = textwrap.dedent(
    """
    import sys
    from adaptr.registry import Registry
    from adaptr.errors import AdaptrError
    reg = Registry(sys.argv[1])
    reg.list()  # the index is opened (and its connection cached) before reindex runs
    for line in sys.stdin:
        cmd, *args = line.split()
        try:
            if cmd == "add":
                out = reg.add(args[0], args[1]).ref
            elif cmd == "get":
                out = reg.get(args[0]).ref
            elif cmd == "list":
                out = ",".join(v.ref for v in reg.list())
        except AdaptrError as e:
            out = f"{type(e).__name__}: {e}"
        print(out, flush=True)
    """
)


class Worker:
    def __init__(self, home: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(home)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

    def ask(self, *words: str) -> str:
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture
def worker(home):
    w = Worker(home)
    yield w
    w.close()


def test_a_process_opened_before_reindex_writes_into_the_new_index(home, tmp_path, cli, worker):
    reg = Registry(home)
    reg.add("q", write_adapter(tmp_path / "a"))
    assert worker.ask("list") == "q@1"
    assert cli("reindex")[0] == 0
    assert worker.ask("add", "q", str(write_adapter(tmp_path / "b", seed=2))) == "q@2"
    # the new index has it: the next add is q@3, and gc keeps q@2's weights
    assert [v.ref for v in reg.list("q")] == ["q@1", "q@2"]
    assert reg.add("q", write_adapter(tmp_path / "c", seed=3)).ref == "q@3"
    assert reg.gc().blobs_removed == 0
    assert reg.verify().ok, reg.verify().problems
    manifests = sorted(p.name for p in (home / "manifests" / "q").glob("*.json"))
    assert manifests == ["1.json", "2.json", "3.json"]


def test_a_running_reader_follows_a_swapped_or_deleted_index(home, tmp_path, cli, worker):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"))
    reg.add("gone", write_adapter(tmp_path / "g", seed=1))
    assert worker.ask("get", "gone") == "gone@1"
    assert cli("reindex")[0] == 0
    reg.add("new", write_adapter(tmp_path / "n", seed=2))
    reg.remove("gone@1")
    reg.gc()
    assert worker.ask("get", "new") == "new@1"  # was 404 on the moved-aside index
    assert worker.ask("get", "gone").startswith("NotFoundError")
    (home / "registry.db").unlink()
    assert worker.ask("get", "a").startswith("IntegrityError")  # the lost index is said


def test_reindex_builds_beside_and_keeps_the_old_index_when_the_build_fails(
    home, tmp_path, monkeypatch
):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"), tags=["prod"])
    before = snapshot(home)
    from adaptr.registry import recovery

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(recovery, "rebuild", broken)
    with pytest.raises(OSError, match="no space left"):
        reg.reindex()
    monkeypatch.undo()
    assert snapshot(home) == before and reg.get("a@prod").ref == "a@1"
    assert not list(home.glob(".registry.db.rebuild-*")) and not list(home.glob("*.old-*"))
    report = reg.reindex()
    assert report.versions == 1 and report.tags == 1 and report.moved_aside


def test_lost_file_rows_are_reported_and_gc_keeps_every_listed_blob(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("m", write_adapter(tmp_path / "a"))
    reg.add("m", write_adapter(tmp_path / "b", seed=1))
    blobs = sorted((home / "blobs").rglob("*/*"))
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("DELETE FROM files")
    conn.commit()
    conn.close()
    code, out, err = cli("verify")
    assert code == 6 and "m@1: the index lists 0 file(s) and its manifest 2" in err, err
    assert cli("gc")[0] == 0
    assert sorted((home / "blobs").rglob("*/*")) == blobs
    assert cli("reindex")[0] == 0
    assert Registry(home).verify().ok and len(Registry(home).get("m@2").files) == 2


def test_a_truncated_manifest_is_found_repaired_and_never_freed(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("m", write_adapter(tmp_path / "a"))
    reg.add("m", write_adapter(tmp_path / "b", seed=1))
    manifest = home / "manifests" / "m" / "2.json"
    whole = manifest.read_text()
    os.truncate(manifest, 100)
    code, out, err = cli("verify")
    assert code == 6 and "m@2: manifest" in err and "unreadable" in err, err
    # with the index intact, reindex rewrites the manifest from it
    code, out, err = cli("reindex")
    assert code == 0 and "rewrote the damaged or missing manifest of m@2" in err, err
    assert json.loads(manifest.read_text()) == json.loads(whole)
    assert Registry(home).verify().ok


def test_a_damaged_manifest_after_an_index_loss_blocks_gc(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("m", write_adapter(tmp_path / "a"))
    reg.add("m", write_adapter(tmp_path / "b", seed=1))
    os.truncate(home / "manifests" / "m" / "2.json", 100)
    (home / "registry.db").unlink()
    blobs = sorted((home / "blobs").rglob("*/*"))
    code, out, err = cli("reindex")
    assert code == 6 and "BAD  m@2: manifest" in err and "not restored" in err, err
    before = snapshot(home)
    line = refused(cli, home, before, "gc", match="gc refused: 1 version manifest(s)")
    assert "m@2" in line
    assert sorted((home / "blobs").rglob("*/*")) == blobs
    # m@2's number is still taken: the next add is m@3
    assert Registry(home).add("m", write_adapter(tmp_path / "c", seed=2)).ref == "m@3"


def test_garbage_state_is_reported_and_taken_from_the_index(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"), tags=["prod"])
    reg.switch("a@prod")
    (home / "state.json").write_text("{not json")
    code, out, err = cli("verify")
    assert code == 6 and "state.json is unreadable" in err, err
    code, out, err = cli("reindex")
    assert code == 0 and "taken from the old index" in err, err
    reg = Registry(home)
    assert reg.get("a@prod").active and reg.active() == {"": ["a@prod"]}
    assert json.loads((home / "state.json").read_text())["tags"] == [["a", "prod", 1]]


def test_garbage_state_with_the_index_lost_is_refused_unless_forced(home, tmp_path, cli):
    reg = Registry(home)
    reg.add("a", write_adapter(tmp_path / "a"))
    reg.add("a", write_adapter(tmp_path / "b", seed=1), tags=["prod"])
    reg.remove("a@2", force=True)
    (home / "state.json").write_text('{"names": "garbage"}')
    (home / "registry.db").unlink()
    before = snapshot(home)
    line = refused(cli, home, before, "reindex", match="state.json is damaged")
    assert "--force" in line
    code, out, err = cli("reindex", "--force")
    assert code == 0, err
    # the removed a@2 left a tombstone: its number is not given out again
    assert Registry(home).add("a", write_adapter(tmp_path / "c", seed=2)).ref == "a@3"


def test_removed_numbers_survive_the_loss_of_index_and_state(home, tmp_path):
    reg = Registry(home)
    for seed in range(3):
        reg.add("x", write_adapter(tmp_path / f"s{seed}", seed=seed))
    reg.remove("x@3")
    reg.remove("x@2")
    (home / "registry.db").unlink()
    (home / "state.json").unlink()
    with pytest.raises(IntegrityError, match="state.json is missing"):
        reg.reindex()
    reg.reindex(force=True)
    assert reg.add("x", write_adapter(tmp_path / "n", seed=9)).ref == "x@4"


def test_add_never_reuses_a_number_the_journal_holds(home, tmp_path):
    """An index whose counter went back (restored from a backup) cannot hand out a number
    whose manifest exists: the manifest is never overwritten."""
    reg = Registry(home)
    reg.add("q", write_adapter(tmp_path / "a"))
    reg.add("q", write_adapter(tmp_path / "b", seed=1))
    first = (home / "manifests" / "q" / "2.json").read_bytes()
    conn = sqlite3.connect(home / "registry.db")
    conn.execute("DELETE FROM files WHERE version_id IN (SELECT id FROM versions WHERE version=2)")
    conn.execute("DELETE FROM versions WHERE version=2")
    conn.execute("UPDATE names SET next_version=2")
    conn.commit()
    conn.close()
    reg2 = Registry(home)
    assert reg2.add("q", write_adapter(tmp_path / "c", seed=2)).ref == "q@3"
    assert (home / "manifests" / "q" / "2.json").read_bytes() == first


def test_reindex_of_a_home_without_manifests_is_refused(tmp_path):
    with pytest.raises(NotFoundError, match="no version manifests"):
        Registry(tmp_path / "empty").reindex()
