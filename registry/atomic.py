"""Crash-safe file system steps shared by the registry and the commands that write folders.

A folder is replaced in renames only (the old one moved aside first, removed after), so a
kill at any instant leaves the old folder or the new one at the path, never a half of
either. Work folders carry their writer's pid, so a later run removes those whose writer
is gone (:func:`sweep`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .blobs import fsync_dir

_PID = re.compile(r"adaptr-[a-z]+-(\d+)-")


def work_dir(kind: str, parent: Path | None = None) -> Path:
    """A fresh folder ``[.]adaptr-KIND-PID-XXXX`` in ``parent`` (hidden) or the temp folder."""
    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep(where)
    prefix = f"{'.' if parent is not None else ''}adaptr-{kind}-{os.getpid()}-"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=where))
    if parent is not None:  # it becomes the user's folder: the usual permissions, not 0700
        umask = os.umask(0o022)
        os.umask(umask)
        path.chmod(0o777 & ~umask)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def sweep(folder: Path) -> list[Path]:
    """Tidy adaptr work folders in ``folder`` whose writer process no longer runs.

    A folder moved aside by :func:`replace_dir` goes back to its place if the writer died
    before the new one took it; every other leftover is removed.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _PID.match(entry.name.lstrip("."))
        if not m or not entry.is_dir() or entry.is_symlink() or _alive(int(m[1])):
            continue
        if entry.name.startswith(".adaptr-old-"):
            home = entry.parent / entry.name[m.end() + 1 :]
            if not home.exists():
                os.replace(entry, home)
                continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one rename (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc != 0:
        err = ctypes.get_errno()
        if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: this file system cannot swap
            return False
        raise OSError(err, os.strerror(err), str(b))
    return True


def replace_dir(new: Path, out: Path) -> None:
    """Put the folder ``new`` at ``out`` (same file system), replacing what is there.

    One atomic swap where the kernel offers it; else the old folder is renamed aside, the
    new one renamed in, and the old one removed (a kill in between is undone by :func:`sweep`).
    """
    new, out = Path(new), Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        out.unlink()
    if not out.exists():
        os.replace(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
    else:
        old = out.parent / f".adaptr-old-{os.getpid()}-{out.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(out.parent)
