"""Folders are replaced in renames only; a killed writer's leftovers are tidied by the next run,
and nothing that adaptr did not make (and mark) is ever touched, whatever its name."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptr.errors import InvalidInputError
from adaptr.registry import atomic

from helpers import write_adapter


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.txt").write_text(text)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no process has it (until the kernel reuses it)


def _tree(root: Path) -> dict[str, str]:
    """Every entry under ``root`` (names, kinds, file contents): to show nothing changed."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def _users_folders(root: Path) -> dict[str, str]:
    """Folders a user may well have, named like adaptr's work folders used to be, with files."""
    for name in (
        "adaptr-runs-20240115-final",  # a date where the pid was
        ".adaptr-old-424242-notes",  # a dead 'pid' and a name to be 'restored' to
        "adaptr-load-1-x",
        f".adaptr-export-{_dead_pid()}-abcdefgh",  # even the exact shape, but no record
        f"adaptr-compose-{_dead_pid()}-k2j4h6g8",
    ):
        _folder(root / name, f"{name}'s work")
        (root / name / "sub").mkdir()
        (root / name / "sub" / "data.bin").write_bytes(os.urandom(64))
    # a record-like file that is not adaptr's (not its JSON) beside a matching folder
    fake = f".adaptr-old-{_dead_pid()}-zzzzzzzz"
    _folder(root / fake, "mine too")
    (root / f"{fake}.work").write_text("my notes on the old work\n")
    return _tree(root)


def _child(code: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    """A Python process running ``code``; it prints a line when it reached the instant to kill."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )


def _kill_when(proc: subprocess.Popen, said: str, sig=signal.SIGKILL) -> None:
    line = proc.stdout.readline().strip()
    assert line == said, line
    proc.send_signal(sig)
    proc.wait(timeout=60)


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "rename-aside"])
def test_replace_dir_puts_the_new_folder_in_place(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    atomic.replace_dir(_folder(tmp_path / "new", "new"), out)
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_replace_dir_of_a_work_folder_leaves_no_record(tmp_path):
    out = _folder(tmp_path / "out", "old")
    work = atomic.work_dir("export", tmp_path)
    (work / "model.txt").write_text("new")
    atomic.replace_dir(work, out)
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


ASIDE_KILLED = """
import os, sys, time
from pathlib import Path
from adaptr.registry import atomic
atomic._exchange = lambda a, b: False  # the rename-aside path
new, out, at = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
real_replace, real_remove = os.replace, atomic.remove_work
def replace(src, dst):
    if at == "between" and Path(src) == new:
        print("between", flush=True); time.sleep(600)
    return real_replace(src, dst)
def remove(path):
    if at == "after" and path.name.startswith(".adaptr-old-"):
        print("after", flush=True); time.sleep(600)
    return real_remove(path)
atomic.os.replace, atomic.remove_work = replace, remove
atomic.replace_dir(new, out)
"""


def test_a_real_kill_between_the_renames_is_undone_by_the_next_run(tmp_path):
    out = _folder(tmp_path / "out", "old")
    (out / "notes.txt").write_text("the user's")
    before = _tree(out)
    new = _folder(tmp_path / "new", "new")
    _kill_when(_child(ASIDE_KILLED, str(new), str(out), "between"), "between")
    assert not out.exists()  # the old folder is aside, under a marked name
    (aside,) = [p for p in tmp_path.glob(".adaptr-old-*") if p.is_dir()]
    assert json.loads(Path(f"{aside}.work").read_text())["out"] == "out"
    assert atomic.sweep(tmp_path) == []
    assert _tree(out) == before  # restored whole, not deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


def test_a_real_kill_after_the_new_folder_took_its_place_removes_the_old(tmp_path):
    out = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / "new", "new")
    _kill_when(_child(ASIDE_KILLED, str(new), str(out), "after"), "after")
    assert (out / "model.txt").read_text() == "new"
    (aside,) = [p for p in tmp_path.glob(".adaptr-old-*") if p.is_dir()]
    assert atomic.sweep(tmp_path) == [aside]
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


WORK_KILLED = """
import sys, time
from pathlib import Path
from adaptr.registry import atomic
work = atomic.work_dir(sys.argv[1], Path(sys.argv[2]) if sys.argv[2] != "-" else None)
(work / "partial.bin").write_bytes(b"half of a model")
print(work, flush=True); time.sleep(600)
"""


def test_a_killed_writers_work_folder_is_swept_a_live_ones_is_kept(tmp_path):
    proc = _child(WORK_KILLED, "merge", str(tmp_path))
    dead = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait(timeout=60)
    assert dead.is_dir() and Path(f"{dead}.work").is_file()
    assert atomic.sweep(tmp_path) == [dead]
    assert not dead.exists() and not Path(f"{dead}.work").exists()
    live = atomic.work_dir("merge", tmp_path)  # this process runs: kept
    assert atomic.sweep(tmp_path) == [] and live.is_dir()
    atomic.remove_work(live)
    assert list(tmp_path.iterdir()) == []


def test_a_killed_writers_temp_folder_is_swept_by_the_next_run(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = _child(WORK_KILLED, "load", "-", env={"TMPDIR": str(tmp)})
    dead = Path(proc.stdout.readline().strip())
    proc.kill()
    proc.wait(timeout=60)
    assert dead.parent == tmp and dead.name.startswith("adaptr-load-")
    code = "from adaptr.registry import atomic\nwith atomic.work_folder('load'): pass"
    subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp)}, check=True)
    assert list(tmp.iterdir()) == []


def test_users_folders_survive_sweeps_work_folders_and_exports_untouched(tmp_path, registry):
    parent = tmp_path / "work"
    parent.mkdir()
    before = _users_folders(parent)
    assert atomic.sweep(parent) == []
    with atomic.work_folder("export", parent):
        pass
    registry.add("a", write_adapter(tmp_path / "a", seed=1))
    registry.export("a", parent / "out")
    registry.export("a", parent / "out", force=True)
    assert {k: v for k, v in _tree(parent).items() if k.split("/")[0] != "out"} == before
    assert not (parent / "notes").exists()  # nothing 'restored' to a name a user folder gave


def test_pid_reuse_a_restart_and_another_host(tmp_path):
    work = atomic.work_dir("merge", tmp_path)
    record = Path(f"{work}.work")
    rec = json.loads(record.read_text())
    assert rec["pid"] == os.getpid() and rec["kind"] == "merge" and rec["folder"] == work.name
    assert not atomic._writer_gone(rec)
    if rec["start"] is not None:  # the same pid, another process: the first one is gone
        assert atomic._writer_gone({**rec, "start": rec["start"] - 1})
    if rec["boot"] is not None:
        assert atomic._writer_gone({**rec, "boot": "another-boot"})
    assert not atomic._writer_gone({**rec, "host": "elsewhere", "pid": _dead_pid()})
    record.write_text(json.dumps({**rec, "host": "elsewhere", "pid": rec["pid"]}))
    assert atomic.sweep(tmp_path) == [] and work.is_dir()  # another host's: left to it
    record.write_text(json.dumps({**rec, "folder": "out"}))  # a record naming another folder
    assert atomic.sweep(tmp_path) == [] and work.is_dir()


def test_work_dir_gives_the_users_permissions_beside_out_and_0700_in_temp(tmp_path, monkeypatch):
    work = atomic.work_dir("export", tmp_path)
    assert work.name.startswith(f".adaptr-export-{os.getpid()}-")
    umask = os.umask(0)
    os.umask(umask)
    assert work.stat().st_mode & 0o777 == 0o777 & ~umask
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "t"))
    (tmp_path / "t").mkdir()
    with atomic.work_folder("load") as tmp:
        assert tmp.parent == tmp_path / "t" and tmp.stat().st_mode & 0o777 == 0o700
    assert list((tmp_path / "t").iterdir()) == []


EXPORT_KILLED = """
import sys, time
from adaptr.registry import Registry, maintenance
real = maintenance.Maintenance._copy_checked
def copy(self, f, dest, ref):
    real(self, f, dest, ref)
    print("copying", flush=True); time.sleep(600)
maintenance.Maintenance._copy_checked = copy
Registry(sys.argv[1]).export("a", sys.argv[2], force=True)
"""


def test_sigkill_mid_export_leaves_the_old_folder_and_a_leftover_the_next_export_sweeps(
    registry, tmp_path
):
    registry.add("a", write_adapter(tmp_path / "a", seed=1))
    out = _folder(tmp_path / "out", "old")
    _kill_when(_child(EXPORT_KILLED, str(registry.home), str(out)), "copying")
    assert _tree(out) == {"model.txt": hashlib.sha256(b"old").hexdigest()}
    (leftover,) = [p for p in tmp_path.glob(".adaptr-export-*") if p.is_dir()]
    assert any(leftover.iterdir())
    registry.export("a", tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_sigkilled_export_over_a_folder_leaves_it_whole(registry, tmp_path):
    registry.add("a", write_adapter(tmp_path / "a", seed=1))
    registry.add("a", write_adapter(tmp_path / "b", seed=2))
    out = registry.export("a@1", tmp_path / "out")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    second = {p.name: p.read_bytes() for p in registry.export("a@2", tmp_path / "o2").iterdir()}
    code = (
        "import sys; from adaptr.registry import Registry; r = Registry(sys.argv[1])\n"
        "print('ready', flush=True)\n"
        "while True: r.export('a@2', sys.argv[2], force=True); r.export('a@1', sys.argv[2], force=True)\n"
    )
    for _ in range(5):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(registry.home), str(out)], stdout=subprocess.PIPE
        )
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(random.uniform(0.0, 0.3))  # anywhere in a loop of exports
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        atomic.sweep(tmp_path)
        have = {p.name: p.read_bytes() for p in out.iterdir()}
        assert have in (first, second)  # one version or the other, never a mix or nothing
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_refuse_in_home(tmp_path):
    home = tmp_path / "home"
    (home / "blobs").mkdir(parents=True)
    (tmp_path / "link").symlink_to(home)
    for out, how in (
        (home, "is the registry home"),
        (tmp_path / "link", "is the registry home"),
        (home / "blobs", "is inside the registry home"),
        (tmp_path / "link" / "blobs" / "new", "is inside the registry home"),
        (home / "runs", "is inside the registry home"),
        (tmp_path, "contains the registry home"),
    ):
        with pytest.raises(InvalidInputError, match=how):
            atomic.refuse_in_home(out, home)
    atomic.refuse_in_home(tmp_path / "elsewhere", home)
    atomic.refuse_in_home(tmp_path / "home2", home)  # a prefix of the name is not inside
    atomic.refuse_in_home(home / "runs" / "x" / "parent", home, inside_ok=(home / "runs",))
    with pytest.raises(InvalidInputError, match="is inside"):
        atomic.refuse_in_home(home / "runs", home, inside_ok=(home / "runs",))


def test_check_path_and_regular_file(tmp_path):
    from adaptr.errors import NotFoundError

    with pytest.raises(InvalidInputError, match="too long"):
        atomic.check_path("a" * 1024, "--base")
    atomic.check_path("org/model", "--base")
    os.mkfifo(tmp_path / "pipe")
    for path, kind in (
        ("/dev/urandom", "is a character device"),
        (tmp_path, "is a folder"),
        (tmp_path / "pipe", "is a named pipe"),
    ):
        with pytest.raises(InvalidInputError, match=kind):
            atomic.regular_file(path, "data file")
    with pytest.raises(NotFoundError, match="does not exist"):
        atomic.regular_file(tmp_path / "nope.jsonl", "data file")
