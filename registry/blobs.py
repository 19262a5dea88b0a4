"""Content-addressed file storage: ``blobs/sha256/ab/abcdef…``, one copy per content.

A blob is written to ``tmp/``, fsynced, renamed into place and its folder fsynced, so a
blob path either holds the complete content or does not exist. Blobs are read-only.
"""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

CHUNK = 8 * 1024 * 1024
_INTACT: set[tuple] = set()  # blobs hashed whole in this process, by identity (see intact)
_INTACT_LOCK = threading.Lock()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_range(h, fd: int, start: int, end: int) -> None:
    """Feed bytes ``[start, end)`` of ``fd`` to ``h`` straight from the page cache (no copy).

    Only for the registry's own staged files, which nobody else truncates. ``start`` is a
    multiple of CHUNK, hence of the mmap granularity.
    """
    for off in range(start, end, CHUNK):
        with mmap.mmap(fd, min(CHUNK, end - off), access=mmap.ACCESS_READ, offset=off) as m:
            h.update(m)


def hash_file(path: Path) -> tuple[str, int]:
    """SHA-256 hex digest and size of a file.

    Read, not mmapped: the file may be the user's (a dataset), and a mapped file that is
    truncated meanwhile kills the process with SIGBUS.
    """
    h = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


class _Progress:
    """Bytes copied so far, shared by the copying thread and the hashing thread."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done = 0
        self.finished = False
        self.error: BaseException | None = None

    def update(
        self, done: int | None = None, finished: bool = False, error: BaseException | None = None
    ) -> None:
        with self.cond:
            self.done = self.done if done is None else done
            self.finished = self.finished or finished or error is not None
            self.error = self.error or error
            self.cond.notify()

    def wait_for(self, needed: int) -> tuple[int, bool]:
        """Block until ``needed`` bytes are copied or the copy ended; (bytes copied, ended)."""
        with self.cond:
            while self.done < needed and not self.finished:
                self.cond.wait()
            return self.done, self.finished


def _copy(fin, fout, progress: _Progress, rehash: _Rehash | None = None) -> None:
    try:
        done = 0
        while n := _copy_chunk(fin, fout):
            done += n
            progress.update(done)
        progress.update(finished=True)
        if rehash is not None:  # the source again, beside the fsync and the tail's hash
            rehash.start()
        os.fsync(fout.fileno())  # overlaps with the hashing of the tail
        if rehash is not None:
            rehash.join()
    except BaseException as e:  # handed to the hashing thread
        progress.update(error=e)


class SourceChanged(Exception):
    """The source of a staged copy no longer holds the copied bytes: it was written during
    the copy, so the copy may mix two states of it."""


class _Rehash(threading.Thread):
    """Hash the source once its copy is done (on the other core, while the copy is fsynced
    and its tail hashed): equal to the copy's hash only if nothing wrote to it meanwhile."""

    def __init__(self, src: Path):
        super().__init__(daemon=True)
        self.src, self.digest, self.error = src, None, None

    def run(self) -> None:
        try:
            self.digest = hash_file(self.src)[0]
        except BaseException as e:
            self.error = e


_NO_KERNEL_COPY = frozenset(
    {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF}
)


def _copy_chunk(fin, fout) -> int:
    """Copy up to CHUNK bytes; the bytes copied, each one written (a short write is retried,
    so a full disk raises ENOSPC instead of leaving fewer bytes than were counted)."""
    try:
        return os.copy_file_range(fin.fileno(), fout.fileno(), CHUNK)
    except AttributeError:
        pass
    except OSError as e:
        if e.errno not in _NO_KERNEL_COPY:
            raise
    data = fin.read(CHUNK)  # no kernel-side copy here: read and write
    view = memoryview(data)
    while view:
        view = view[fout.write(view) :]
    return len(data)


def copy_and_hash(src: Path, dest: Path, recheck: bool = False) -> tuple[str, int]:
    """Copy ``src`` to ``dest`` and fsync it, while this thread hashes ``dest`` behind the copy.

    With ``recheck``, ``src`` is hashed again once copied, and SourceChanged raised unless it
    still holds exactly the copied bytes (a writer rewriting it in place meanwhile, as rsync
    ``--inplace`` or an mmap writer do, leaves a copy that mixes its old and new bytes).
    """
    rehash = _Rehash(Path(src)) if recheck else None
    with (
        open(src, "rb", buffering=0) as fin,
        open(dest, "wb", buffering=0) as fout,
        open(dest, "rb", buffering=0) as reader,
    ):
        progress = _Progress()
        worker = threading.Thread(target=_copy, args=(fin, fout, progress, rehash), daemon=True)
        worker.start()
        h = hashlib.sha256()
        hashed = 0
        while True:
            limit, finished = progress.wait_for(hashed + CHUNK)
            # whole chunks only until the copy ends, so every mmap offset stays aligned
            end = limit if finished else hashed + (limit - hashed) // CHUNK * CHUNK
            _hash_range(h, reader.fileno(), hashed, end)
            hashed = end
            if finished:
                break
        worker.join()
    if progress.error is not None:
        raise progress.error
    digest = h.hexdigest()
    if rehash is not None:
        if rehash.error is not None:
            raise rehash.error
        if rehash.digest != digest:
            raise SourceChanged(f"{src} was written to while it was copied")
    return digest, hashed


class BlobStore:
    """Immutable files named by their SHA-256."""

    def __init__(self, home: Path):
        self.root = home / "blobs" / "sha256"
        self.tmp = home / "tmp"

    def local(self, digest: str) -> Path:
        """Where the blob lies in this home (a cache of a store never fetches it here)."""
        return self.root / digest[:2] / digest

    def path(self, digest: str) -> Path:
        """The blob's file, to read."""
        return self.local(digest)

    def put(self, src: Path) -> tuple[str, int]:
        """Store a copy of ``src``; returns its digest and size. Identical content is stored once.

        The copy (kernel-side, then fsync) and the hash run side by side; the hash is taken
        over the staged copy, so the name always matches the stored bytes, even if ``src``
        changes meanwhile.
        """
        self.tmp.mkdir(parents=True, exist_ok=True)
        part = self.tmp / f"{os.getpid()}-{secrets.token_hex(6)}.part"
        try:
            digest, size = copy_and_hash(src, part)
            self.adopt(part, digest, size)
            return digest, size
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def stage(self, src: Path, dest: Path) -> tuple[str, int]:
        """Copy ``src`` to ``dest`` (under ``tmp/``), fsynced; the digest and size of the copy,
        which is one whole state of ``src`` (else SourceChanged)."""
        return copy_and_hash(src, dest, recheck=True)

    def adopt(self, staged: Path, digest: str, size: int) -> bool:
        """Move a staged copy whose digest is known into the store (dropped if already there).

        A stored blob of that name is trusted only once re-hashed: one whose bytes are not
        its name (a flipped bit) is replaced by the staged copy, so a re-add repairs it
        instead of being born corrupt. Returns whether a damaged blob was replaced. Only the
        local file is looked at: an add never fetches what it is about to store.
        """
        final = self.local(digest)
        repaired = False
        if final.is_file() and not final.is_symlink():
            if self.local_intact(digest):
                staged.unlink()
                return False
            repaired = True
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged, 0o444)
        os.replace(staged, final)
        fsync_dir(final.parent)
        return repaired

    def intact(self, digest: str) -> bool:
        """Whether the blob exists and its bytes hash to its name."""
        return self.local_intact(digest)

    def local_intact(self, digest: str) -> bool:
        """Whether the local file of the blob exists and its bytes hash to its name.

        Remembered per process by the file's identity and times (inode, size, mtime, ctime):
        any change made through the file system moves ctime, so a blob is re-hashed after
        every write to it, and only then.
        """
        p = self.local(digest)
        try:
            st = p.stat()
        except OSError:
            return False
        key = (digest, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        if key in _INTACT:
            return True
        try:
            ok = hash_file(p)[0] == digest
        except OSError:
            return False
        if ok:
            with _INTACT_LOCK:
                _INTACT.add(key)
        return ok

    def read_checked(self, digest: str, what: str) -> bytes:
        """The blob's bytes, hashed as read: IntegrityError unless they are its name.

        What is served or scored is these bytes, not a second read of the file."""
        from adaptr.errors import IntegrityError

        try:
            data = self.path(digest).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{what} is missing from the store; run `adaptr verify`") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise IntegrityError(
                f"{what} is corrupt in the store (its SHA-256 is not {digest[:12]}…); nothing "
                "was loaded: run `adaptr verify`, and re-add the adapter from its source to repair it"
            )
        return data

    def digests(self) -> Iterator[str]:
        """Every stored digest."""
        if not self.root.is_dir():
            return
        for sub in self.root.iterdir():
            # never through a link: gc deletes what this yields, and a linked shard (or blob)
            # is a file outside the store
            if sub.is_dir() and not sub.is_symlink():
                for blob in sub.iterdir():
                    if not blob.is_symlink():
                        yield blob.name

    def strays(self) -> list[Path]:
        """Links in the store (a shard folder or blob that is a symlink): never followed."""
        if not self.root.is_dir():
            return []
        out = [sub for sub in self.root.iterdir() if sub.is_symlink()]
        for sub in self.root.iterdir():
            if sub.is_dir() and not sub.is_symlink():
                out += [b for b in sub.iterdir() if b.is_symlink()]
        return out

    def remove(self, digest: str) -> int:
        """Delete one blob; returns the bytes freed."""
        p = self.path(digest)
        if p.parent.is_symlink() or p.is_symlink():
            return 0  # never delete through a link out of the store
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
                if part.is_dir() and not part.is_symlink():
                    import shutil

                    freed += sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
                    shutil.rmtree(part, ignore_errors=True)
                else:
                    freed += part.stat().st_size
                    part.unlink()
        return freed
