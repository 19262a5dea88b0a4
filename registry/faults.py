"""What a write does when the disk is full: one line naming where, the registry unchanged.

A full disk reaches adaptr as an ``OSError`` (``ENOSPC``, ``EDQUOT``), as SQLite's
``database or disk is full``, or as an I/O error of SQLite's shared memory file when not
even its few kilobytes fit. Each is turned into :class:`StorageFullError` at the edge of a
registry write, after the write's own clean-up ran, so no caller sees ``internal error``.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptr.errors import AdaptrError, StorageFullError

FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
LOW_SPACE = 1 << 20  # below this much free space an SQLite I/O error is taken as a full disk


def free_bytes(path: Path) -> int | None:
    """Free bytes for unprivileged writers on the file system holding ``path``."""
    for p in (Path(path), *Path(path).parents):
        try:
            st = os.statvfs(p)
        except OSError:
            continue
        return st.f_bavail * st.f_frsize
    return None


def is_full(exc: BaseException, where: Path | None = None) -> bool:
    """Whether ``exc`` means the device ran out of space (or quota)."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno in FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name == "SQLITE_FULL" or "disk is full" in str(exc):
            return True
        if where is not None and (name.startswith("SQLITE_IOERR") or name == "SQLITE_CANTOPEN"):
            free = free_bytes(where)
            return free is not None and free < LOW_SPACE
        return False
    # a library's own error around the OS's (safetensors: "No space left on device (os error 28)")
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text


def full_error(where: Path, what: str) -> StorageFullError:
    free = free_bytes(where)
    left = f" ({free // 1024} KB free)" if free is not None else ""
    return StorageFullError(
        f"no space left on the device holding {where}{left} while {what}; nothing was stored "
        "and the registry is unchanged: free some space and run the command again"
    )


@contextmanager
def storage_errors(where: Path, what: str) -> Iterator[None]:
    """Turn a full disk inside the block into one :class:`StorageFullError` line."""
    try:
        yield
    except AdaptrError:
        raise
    except (OSError, sqlite3.Error) as e:
        if is_full(e, where):
            raise full_error(where, what) from e
        raise
