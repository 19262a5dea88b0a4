"""Folders are replaced in renames only; a killed writer's leftovers are tidied by the next run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptr.registry import atomic


def _folder(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "model.txt").write_text(text)
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # finished and reaped: no process has it (until the kernel reuses it)


@pytest.mark.parametrize("swap", [True, False], ids=["exchange", "rename-aside"])
def test_replace_dir_puts_the_new_folder_in_place(tmp_path, monkeypatch, swap):
    if not swap:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    atomic.replace_dir(_folder(tmp_path / "new", "new"), out)
    assert (out / "model.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_kill_between_the_renames_is_undone_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    out = _folder(tmp_path / "out", "old")
    new = _folder(tmp_path / "new", "new")
    real = os.replace

    def die_on_the_second(src, dst):
        if Path(src) == new:
            raise KeyboardInterrupt  # stands for SIGKILL: nothing after this runs
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", die_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        atomic.replace_dir(new, out)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert not out.exists()
    (aside,) = tmp_path.glob(".adaptr-old-*")
    aside.rename(tmp_path / f".adaptr-old-{_dead_pid()}-out")  # its writer is gone
    atomic.sweep(tmp_path)
    assert (out / "model.txt").read_text() == "old"  # restored, not deleted


def test_sweep_removes_dead_writers_work_folders_and_keeps_live_ones(tmp_path):
    dead = _folder(tmp_path / f".adaptr-merge-{_dead_pid()}-abc", "partial")
    live = _folder(tmp_path / f".adaptr-merge-{os.getpid()}-xyz", "in progress")
    mine = _folder(tmp_path / "adaptr-merge-notes", "a user's folder")
    atomic.sweep(tmp_path)
    assert not dead.exists() and live.exists() and mine.exists()


def test_work_dir_sweeps_first_and_gives_the_users_permissions(tmp_path):
    dead = _folder(tmp_path / f".adaptr-export-{_dead_pid()}-abc", "partial")
    work = atomic.work_dir("export", tmp_path)
    assert not dead.exists() and work.name.startswith(f".adaptr-export-{os.getpid()}-")
    umask = os.umask(0)
    os.umask(umask)
    assert work.stat().st_mode & 0o777 == 0o777 & ~umask


def test_sigkilled_export_over_a_folder_leaves_it_whole(registry, tmp_path):
    from helpers import write_adapter

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
