"""The replica's blob store as a verified cache of the store's ``blobs/sha256/``.

``path(digest)`` hands back a local file: downloaded on first use into ``tmp/``, hashed as
it streams, and only then renamed (read-only) into ``blobs/sha256/``. An object whose bytes
are not its name is refused (IntegrityError) and never lands in the cache; a cached file
found corrupt later is dropped and fetched again once, then refused.
"""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from adaptr.errors import IntegrityError
from adaptr.registry.blobs import BlobStore, fsync_dir
from adaptr.registry.remote import layout
from adaptr.registry.remote.store import NotFound, ObjectStore


class CachedBlobStore(BlobStore):
    def __init__(self, home: Path, store: ObjectStore):
        super().__init__(home)
        self.store = store
        self._lock = threading.Lock()
        self.downloaded = 0  # bytes fetched by this process (bench and tests read it)

    def path(self, digest: str) -> Path:
        p = self.local(digest)
        if not p.is_file():
            self.fetch(digest)
        return p

    def fetch(self, digest: str) -> bool:
        """Download one blob into the cache, verified; False when the store lacks it."""
        p = self.local(digest)
        if p.is_file():
            return True
        self.tmp.mkdir(parents=True, exist_ok=True)
        part = self.tmp / f"get-{os.getpid()}-{secrets.token_hex(6)}.part"
        try:
            size = self.store.download(layout.blob(digest), part, digest)
        except NotFound:
            return False
        p.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(part, 0o444)
        os.replace(part, p)
        fsync_dir(p.parent)
        with self._lock:
            self.downloaded += size
        return True

    def _drop_local(self, digest: str) -> None:
        p = self.local(digest)
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)

    def intact(self, digest: str) -> bool:
        if not self.local(digest).is_file():
            try:
                if not self.fetch(digest):
                    return False
            except IntegrityError:
                return False
        if self.local_intact(digest):
            return True
        self._drop_local(digest)  # corrupt in the cache: the store's copy, once
        try:
            return self.fetch(digest) and self.local_intact(digest)
        except IntegrityError:
            return False

    def read_checked(self, digest: str, what: str) -> bytes:
        self.path(digest)
        try:
            return super().read_checked(digest, what)
        except IntegrityError:
            self._drop_local(digest)
            self.fetch(digest)  # refused (IntegrityError) when the store's copy is bad too
            return super().read_checked(digest, what)

    def remove(self, digest: str) -> int:
        p = self.local(digest)
        if p.parent.is_symlink() or p.is_symlink():
            return 0
        try:
            size = p.stat().st_size
            p.unlink()
        except FileNotFoundError:
            return 0
        return size
