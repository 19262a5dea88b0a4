"""registry/recovery.py and the journal it reads: reindex beside a live registry, damaged
manifests and state, lost file rows, version numbers that are never given out twice."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adaptr.errors import NotFoundError
from adaptr.registry import Registry

from helpers import snapshot, write_adapter

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


def test_reindex_of_a_home_without_manifests_is_refused(tmp_path):
    with pytest.raises(NotFoundError, match="no version manifests"):
        Registry(tmp_path / "empty").reindex()
