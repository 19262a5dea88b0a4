"""The registry's writer lock: an exclusive ``flock`` on ``HOME/lock``.

The kernel drops the lock when its holder dies, even by SIGKILL, so a crashed writer
never wedges the registry. Uses stdlib ``fcntl`` (fast to import); elsewhere ``filelock``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptr.errors import LockTimeoutError


@contextmanager
def writer_lock(path: Path, timeout: float) -> Iterator[None]:
    """Hold the exclusive lock at ``path``, waiting up to ``timeout`` seconds for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield from _filelock(path, timeout)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise _timeout(path, timeout) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _filelock(path: Path, timeout: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise _timeout(path, timeout) from None
    try:
        yield
    finally:
        lock.release()


def _timeout(path: Path, timeout: float) -> LockTimeoutError:
    return LockTimeoutError(
        f"another adaptr process has held the writer lock on {path.parent} for {timeout:g}s; "
        "wait for it to finish (or raise ADAPTR_LOCK_TIMEOUT)"
    )
