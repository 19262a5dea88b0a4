"""Crash-safe file system steps shared by the registry and the commands that write folders.

A folder is replaced in renames only (the old one moved aside first, removed after), so a
kill at any instant leaves the old folder or the new one at the path, never a half of
either.

Work folders (and folders moved aside) are marked, so that a later run can tidy what a
killed writer left (:func:`sweep`) and never touch anything else. The mark is a record
file beside the folder, ``NAME.work``, written (and synced) *before* the folder exists
and removed only after the folder is gone: so at every instant a leftover of adaptr's has
its record, and a folder without one is left alone whatever its name. The record is JSON
naming the writer (pid, the start time of that process, the host and its boot) and what
the folder is for. A folder is outside the record, never inside it, because a work folder
becomes the user's output by a rename, and a folder moved aside is the user's and goes
back unchanged.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptr.errors import InvalidInputError, brief, clip
from adaptr.registry.blobs import fsync_dir

RECORD = ".work"
MARK = "adaptr-work-folder"  # the record's "adaptr" field: a JSON file that says so is ours
_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile.mkdtemp's
_TOKEN = 8
# exactly what work_dir and replace_dir generate: [.]adaptr-KIND-PID-TOKEN.work
_NAME = re.compile(rf"(\.?)adaptr-([a-z]+)-([1-9]\d{{0,9}})-([a-z0-9_]{{{_TOKEN}}})")
MAX_RECORD = 4096


# ------------------------------------------------------------------ who wrote a folder
def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat), None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22; fields 3… follow ")"
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _writer() -> dict:
    pid = os.getpid()
    return {
        "adaptr": MARK,
        "pid": pid,
        "start": _start_time(pid),
        "host": socket.gethostname(),
        "boot": _boot_id(),
        "created": time.time(),
    }


def _writer_gone(rec: dict) -> bool:
    """Whether the process that wrote ``rec`` no longer runs (False when it cannot be told:
    another host, or a process of another user)."""
    if rec.get("host") != socket.gethostname():
        return False  # a shared folder: that host's own runs tidy it
    boot = _boot_id()
    if rec.get("boot") and boot and rec["boot"] != boot:
        return True  # the machine restarted since
    pid = rec["pid"]
    if not _alive(pid):
        return True
    start, recorded = _start_time(pid), rec.get("start")
    return start is not None and recorded is not None and start != recorded  # pid reused


# ------------------------------------------------------------------ records
def _record_path(folder: Path) -> Path:
    return folder.with_name(folder.name + RECORD)


def _write_record(path: Path, doc: dict) -> None:
    """Create the record ``path`` (never over an existing file) and sync it to disk."""
    data = json.dumps(doc).encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)  # one small write: a kill leaves all of it or an empty file
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


def _read_record(path: Path) -> dict | None:
    """The record at ``path`` if it is one of adaptr's, whole and matching its own name."""
    m = _NAME.fullmatch(path.name[: -len(RECORD)]) if path.name.endswith(RECORD) else None
    if m is None:
        return None
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_RECORD:
            return None
        rec = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get("adaptr") != MARK:
        return None
    if rec.get("kind") != m[2] or rec.get("pid") != int(m[3]) or rec.get("folder") != m[0]:
        return None
    if not isinstance(rec.get("host"), str):
        return None
    if m[2] == "old" and not _plain_name(rec.get("out")):
        return None
    return rec


def _plain_name(name) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name


def _reserve(where: Path, kind: str, hidden: bool, **extra) -> Path:
    """A fresh path ``[.]adaptr-KIND-PID-TOKEN`` in ``where`` whose record is written (the
    path itself is not made)."""
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"work folder kind {kind!r}: lowercase letters only")
    for _ in range(100):
        token = "".join(secrets.choice(_ALPHABET) for _ in range(_TOKEN))
        name = f"{'.' if hidden else ''}adaptr-{kind}-{os.getpid()}-{token}"
        path = where / name
        if os.path.lexists(path):
            continue
        try:
            _write_record(_record_path(path), {**_writer(), "kind": kind, "folder": name, **extra})
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free work folder name in {where}")


def _drop_record(folder: Path) -> None:
    """Remove ``folder``'s record if it is this process's (the folder is gone or is the user's)."""
    rec = _read_record(_record_path(folder))
    if rec is not None and rec["pid"] == os.getpid():
        _record_path(folder).unlink(missing_ok=True)


# ------------------------------------------------------------------ work folders
def work_dir(kind: str, parent: Path | None = None) -> Path:
    """A fresh marked folder ``[.]adaptr-KIND-PID-TOKEN`` in ``parent`` (hidden) or the temp
    folder, after tidying what killed writers left there. Remove it with :func:`remove_work`
    (or use :func:`work_folder`); a killed run's is removed by the next run's sweep."""
    import tempfile  # out of the read commands' start-up

    where = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    sweep(where)
    path = _reserve(where, kind, hidden=parent is not None)
    try:
        # in parent it becomes the user's folder: the usual permissions (umask), not 0700
        os.mkdir(path, 0o777 if parent is not None else 0o700)
    except BaseException:
        _record_path(path).unlink(missing_ok=True)
        raise
    return path


def remove_work(path: Path) -> None:
    """Remove the work folder ``path`` (if still there), then its record."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    if not os.path.lexists(path):
        _drop_record(path)


@contextmanager
def work_folder(kind: str, parent: Path | None = None) -> Iterator[Path]:
    """:func:`work_dir` for the block, removed with its record afterwards, whatever happens."""
    path = work_dir(kind, parent)
    try:
        yield path
    finally:
        remove_work(path)


def sweep(folder: Path) -> list[Path]:
    """Tidy what adaptr writers that no longer run left in ``folder``: only folders with a
    whole record of adaptr's (see the module's docstring) and that record's own name.

    A folder moved aside by :func:`replace_dir` goes back to its place if the writer died
    before the new one took it; every other leftover is removed. Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = [e for e in Path(folder).iterdir() if e.name.endswith(RECORD)]
    except OSError:
        return removed
    for record in entries:
        rec = _read_record(record)
        if rec is None:
            continue
        try:
            if not _writer_gone(rec):
                continue
            target = record.with_name(rec["folder"])
            if os.path.lexists(target) and (target.is_symlink() or not target.is_dir()):
                continue  # not what adaptr made there: left alone, and so is its record
            if rec["kind"] == "old" and target.exists():
                home = record.with_name(rec["out"])
                if not os.path.lexists(home):  # killed before the new folder took its place
                    os.replace(target, home)
            if target.exists():
                shutil.rmtree(target, ignore_errors=True)
                removed.append(target)
            if not os.path.lexists(target):
                record.unlink(missing_ok=True)
        except OSError:  # a concurrent sweep got there first, or a folder we may not touch
            continue
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

    One atomic swap where the kernel offers it (the old folder then lies at ``new``, a work
    folder, and is removed with it). Else the old folder is renamed aside to a marked path
    whose record (written first) names ``out``, the new one renamed in, and the old one
    removed: a kill in between is undone by :func:`sweep`, which puts the old folder back.
    ``new``'s record, if it is a work folder, is dropped once nothing is left at its path.
    """
    new, out = Path(new), Path(out)
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        out.unlink()
    if not out.exists():
        os.replace(new, out)
    elif _exchange(new, out):
        shutil.rmtree(new, ignore_errors=True)  # now the old folder
    else:
        aside = _reserve(out.parent, "old", hidden=True, out=out.name)
        os.replace(out, aside)
        os.replace(new, out)
        fsync_dir(out.parent)
        remove_work(aside)
    fsync_dir(out.parent)
    if not os.path.lexists(new):
        _drop_record(new)


# ------------------------------------------------------------------ refusals and signals
def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _lineage(path: Path) -> list[Path]:
    """``path`` and its ancestors, symlinks resolved (as far as they exist)."""
    real = Path(os.path.realpath(path))
    return [real, *real.parents]


def refuse_in_home(
    out: str | Path,
    home: str | Path,
    what: str = "the output folder",
    *,
    inside_ok: tuple[str | Path, ...] = (),
) -> None:
    """Refuse (InvalidInputError) an output folder that is the registry home, lies inside it,
    or contains it: writing (or replacing) it would damage the store.

    ``inside_ok``: folders of the home whose insides adaptr itself writes to (the training
    runs, ``home/runs``), allowed for its own internal steps; never for a user's output.
    """
    out_p, home_p = Path(out).expanduser(), Path(home).expanduser()
    outs, homes = _lineage(out_p), _lineage(home_p)
    out_real, home_real = outs[0], homes[0]
    if out_real == home_real or _same(out_real, home_real):
        how = "is the registry home"
    elif home_real in outs or any(_same(p, home_real) for p in outs[1:] if os.path.exists(p)):
        scratch = [_lineage(Path(d).expanduser())[0] for d in inside_ok]
        if any(d in outs[1:] for d in scratch):
            return
        how = f"is inside the registry home {home_real}"
    elif out_real in homes or any(_same(p, out_real) for p in homes[1:] if os.path.exists(p)):
        how = f"contains the registry home {home_real}"
    else:
        return
    raise InvalidInputError(
        f"{clip(str(out), 200)} {how}: writing {what} there would change the store; "
        "choose a folder outside the registry home"
    )


def check_path(text: str | None, what: str) -> None:
    """Refuse (InvalidInputError, one line) a path or name no file system can hold: a part
    longer than the file system allows (255 bytes, usually) or too long a whole."""
    if text is None:
        return
    raw = os.fsencode(str(text))
    try:
        name_max = os.pathconf("/", "PC_NAME_MAX")
        path_max = os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        name_max, path_max = 255, 4096
    longest = max((len(part) for part in raw.split(b"/")), default=0)
    if longest > name_max or len(raw) >= path_max:
        size = f"a part of {longest:,} bytes" if longest > name_max else f"{len(raw):,} bytes"
        raise InvalidInputError(
            f"{what} {brief(str(text), 60)} is too long to be a name, folder or file "
            f"({size}; the file system allows {name_max} per part, {path_max} in all)"
        )


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def regular_file(
    path: str | Path, what: str, use: str = "give a JSONL, JSON, CSV or Parquet file"
) -> Path:
    """``path`` (``~`` expanded) if it is a regular file (or a link to one); else a one-line
    error saying what it is: missing (NotFoundError), a folder, a device, a pipe…"""
    from adaptr.errors import NotFoundError

    check_path(str(path), what)
    p = Path(path).expanduser()
    try:
        mode = os.stat(p).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise NotFoundError(f"{what} {clip(str(p), 200)} does not exist: {use}") from None
    except OSError as e:
        raise InvalidInputError(
            f"{what} {clip(str(p), 200)} cannot be read ({e.strerror or e}): {use}"
        ) from None
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "of an unknown kind")
        raise InvalidInputError(f"{what} {clip(str(p), 200)} is {kind}, not a regular file: {use}")
    return p


@contextmanager
def exit_on_sigterm() -> Iterator[None]:
    """While the block runs, SIGTERM ends the process as ``SystemExit(143)`` raised where it
    is, so ``finally`` blocks remove work folders (a second SIGTERM ends it at once). In
    other threads than the main one: a no-op (the next run's sweep tidies instead)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
