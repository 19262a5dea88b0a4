"""Content-addressed file storage: ``blobs/sha256/ab/abcdef…``, one copy per content.

A blob is written to ``tmp/``, fsynced, renamed into place and its folder fsynced, so a
blob path either holds the complete content or does not exist. Blobs are read-only.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

CHUNK = 8 * 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file."""
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


class BlobStore:
    """Immutable files named by their SHA-256."""

    def __init__(self, home: Path):
        self.root = home / "blobs" / "sha256"
        self.tmp = home / "tmp"

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, src: Path) -> tuple[str, int]:
        """Store a copy of ``src``; returns its digest and size. Identical content is stored once."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        part = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}.part"
        h = hashlib.sha256()
        size = 0
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        try:
            with open(src, "rb", buffering=0) as fin, open(part, "wb", buffering=0) as fout:
                while n := fin.readinto(buf):
                    h.update(view[:n])
                    fout.write(view[:n])
                    size += n
                os.fsync(fout.fileno())
            digest = h.hexdigest()
            final = self.path(digest)
            if final.exists() and final.stat().st_size == size:
                part.unlink()
                return digest, size
            final.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(part, 0o444)
            os.replace(part, final)
            fsync_dir(final.parent)
            return digest, size
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def digests(self) -> Iterator[str]:
        """Every stored digest."""
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            if sub.is_dir():
                for blob in sub.iterdir():
                    yield blob.name

    def remove(self, digest: str) -> int:
        """Delete one blob; returns the bytes freed."""
        p = self.path(digest)
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size

    def clear_tmp(self) -> int:
        """Delete staged files left by interrupted writers (call with the writer lock held)."""
        freed = 0
        if self.tmp.is_dir():
            for part in self.tmp.iterdir():
                freed += part.stat().st_size
                part.unlink()
        return freed
