"""``RemoteRegistry``: a registry whose truth is an object store, run on a local replica.

Protocols (keys in ``layout.py``):

* add: the files are staged and hashed into the replica as a local add does; then for each
  blob an upload marker ``uploads/<digest>.<rand>`` is written, and the blob uploaded unless
  the store has it; then the manifest is created at ``versions/NAME/N.json`` with
  If-None-Match: * for N = one past the highest number the replica knows, N+1 on 412, and
  so on: two machines adding at once get different numbers. The blobs are checked again
  after the create (one re-uploaded if a gc took it). A process killed at any point before
  the create leaves no version, only blobs and markers that gc reaps after its grace.
* tag / untag / switch: the object is created (If-None-Match: *) or replaced with If-Match
  the ETag the replica last saw: a writer that lost the race gets ConflictError naming
  where the tag is now, and nothing is overwritten.
* rm: the manifest is replaced (If-Match) by a tombstone, so its number is never given out
  again; tags on it are set to null, active references pruned, blobs left to gc.
* reads: the replica is refreshed when older than ``$ADAPTR_REMOTE_TTL`` seconds (default
  2; the first read of a process always refreshes). An unreachable store leaves the
  replica serving what it holds (one note on stderr); writes need the store and fail in one
  line naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

from adaptr.errors import (
    ConflictError,
    IncompatibleBaseError,
    InvalidInputError,
    NotFoundError,
)
from adaptr.registry.bases import model_folder
from adaptr.registry.evals import stamped
from adaptr.registry.journal import write_json
from adaptr.registry.models import AdapterVersion, BaseRecord, RebuildReport
from adaptr.registry.refs import Ref, check_name, check_tag
from adaptr.registry.registry import Registry
from adaptr.registry.remote import MARKER, checkpoint, layout
from adaptr.registry.remote.blobcache import CachedBlobStore
from adaptr.registry.remote.store import (
    Location,
    NotFound,
    ObjectStore,
    PreconditionFailed,
    StoreError,
    Unreachable,
)
from adaptr.registry.remote.sync import BINDINGS, STATE, SyncState, load_bindings, pull
from adaptr.registry.resolve import names_like, resolves
from adaptr.registry.tags import ANY, check_expected, common_base

MAX_CREATE_TRIES = 10_000


def cache_home(location: Location, endpoint: str) -> Path:
    """``$ADAPTR_CACHE/<hash>``, else ``$XDG_CACHE_HOME`` or ``~/.cache`` + ``adaptr/remote/<hash>``:
    one replica per store address and endpoint."""
    root = os.environ.get("ADAPTR_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        base = Path(xdg).expanduser() / "adaptr" / "remote"
    digest = hashlib.sha256(f"{endpoint}\n{location.url}".encode()).hexdigest()[:16]
    return base / f"{location.bucket}-{digest}"


def _ttl() -> float:
    try:
        return max(0.0, float(os.environ.get("ADAPTR_REMOTE_TTL", "2")))
    except ValueError:
        return 2.0


def _intact_on_store(meta, local: Path) -> bool:
    """Whether the store's object (its HEAD, None if absent) holds the local, verified bytes
    as far as the store can tell without a download: the same size, and for a single-part
    object (ETag = the MD5 of its bytes) the same MD5. A re-add then repairs an object
    truncated, or changed in a small file, instead of keeping it."""
    if meta is None:
        return False
    size = local.stat().st_size
    if meta.size != size:
        return False
    tag = meta.etag.strip('"').lower()
    if len(tag) == 32 and all(c in "0123456789abcdef" for c in tag):
        md5 = hashlib.md5(usedforsecurity=False)
        with open(local, "rb") as f:
            while chunk := f.read(8 << 20):
                md5.update(chunk)
        return md5.hexdigest() == tag
    return True  # a multipart ETag says nothing of the bytes: verify checks them by download


class RemoteRegistry(Registry):
    """A registry home on an object store (``s3://BUCKET/PREFIX``), with a local replica."""

    def __init__(self, home: str | Path | None = None, *, cache: str | Path | None = None):
        home = home if home is not None else os.environ.get("ADAPTR_HOME")
        replica = (
            Path(str(home)).expanduser() if home and not str(home).startswith("s3://") else None
        )
        if replica is not None:  # a replica's folder (vLLM's processes get this as ADAPTR_HOME)
            url = json.loads((replica / MARKER).read_text(encoding="utf-8"))["url"]
            cache = cache or replica
        else:
            url = str(home)
        self.location = Location.parse(url)
        self.store = ObjectStore(self.location)
        super().__init__(
            Path(cache).expanduser() if cache else cache_home(self.location, self.store.endpoint)
        )
        self.blobs = CachedBlobStore(self.home, self.store)
        self.ttl = _ttl()
        self._synced_at: float | None = None
        self._state = SyncState()
        self._held = threading.local()
        self._sync_lock = threading.Lock()
        self._warned = False

    def __repr__(self) -> str:
        return f"RemoteRegistry({self.location.url!r}, cache={str(self.home)!r})"

    @property
    def url(self) -> str:
        return self.location.url

    # ---------------------------------------------------------------- replica
    @contextmanager
    def _locked(self) -> Iterator[None]:
        """The replica's writer lock, re-entrant within a thread (a sync inside a write)."""
        depth = getattr(self._held, "depth", 0)
        if depth:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth -= 1
            return
        with super()._locked():
            self._held.depth = 1
            try:
                yield
            finally:
                self._held.depth = 0

    def _conn(self, create: bool = False):
        if not getattr(self._held, "syncing", False):
            self.sync(force=False)
        return super()._conn(create=True)

    def sync(self, force: bool = True) -> SyncState:
        """Bring the replica up to date (unless it is fresher than the TTL and not ``force``).

        Unreachable on a read (not ``force``): the replica as it is, with one note."""
        if (
            not force
            and self._synced_at is not None
            and time.monotonic() - self._synced_at < self.ttl
        ):
            return self._state
        with self._sync_lock if not getattr(self._held, "depth", 0) else _null():
            try:
                self._pull()
            except Unreachable as e:
                if force or not (self.home / STATE).exists():  # never synced: nothing to show
                    raise
                if not self._warned:
                    self._warned = True
                    print(
                        f"note: {e.brief}; showing the local cache {self.home} as last synced",
                        file=sys.stderr,
                    )
                self._synced_at = time.monotonic()  # retried after the TTL, not on every read
        return self._state

    def _pull(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        marker = self.home / MARKER
        if not marker.is_file():
            write_json(marker, {"url": self.location.url, "endpoint": self.store.endpoint})
        started = time.monotonic()
        self._held.syncing = True
        try:
            with self._locked():
                conn = super()._conn(create=True)
                self._state = pull(self.store, conn, self.journal, self.home)
        finally:
            self._held.syncing = False
        self._synced_at = started

    def expire(self) -> None:
        """Make the next read refresh the replica, as one past the TTL does."""
        self._synced_at = None

    def require(self) -> None:
        """Before a write: the store must answer, and hold a registry."""
        self.sync(force=True)
        empty = not (self._state.manifests or self._state.bases or self._state.tags)
        if empty and not self.store.list(layout.UPLOADS):
            raise NotFoundError(
                f"no registry at {self.url}: add an adapter first, or pass --home (or set "
                "ADAPTR_HOME) to the registry you mean"
            )

    def index_lost(self, conn) -> str | None:
        return None  # the replica is rebuilt from the store, never trusted alone

    @contextmanager
    def _writer(self, *, creates: bool = False, notes: list[str] | None = None):
        self.sync(force=True)
        with super()._writer(creates=True, notes=notes) as conn:
            yield conn

    def _unknown(self, name: str, conn) -> NotFoundError:
        close = names_like(name, conn)
        hint = (
            f"did you mean {close[0]!r}?"
            if close
            else "run `adaptr list` to see the registered adapters"
        )
        return NotFoundError(f"unknown adapter {name!r} in {self.url}: {hint}")

    # ------------------------------------------------------------------- add
    def add(self, name: str, source, *, tags: Sequence[str] = (), **kwargs) -> AdapterVersion:
        check_name(name)
        for t in tags:
            check_tag(t)
        self.store.check()  # an unreachable store is said before anything is copied
        added = super().add(name, source, tags=(), **kwargs)
        for t in tags:
            self.tag(added.ref, t)
        if not tags:
            return added
        return replace(self.get(added.ref), skipped=added.skipped, warnings=added.warnings)

    def _publish(self, record: dict) -> dict:
        """Make a version visible on the store: blobs first, then its manifest's create."""
        digests = sorted({f["sha256"] for f in record["files"]})
        for d in digests:
            self.store.put(layout.upload_marker(d), b"")
            if not _intact_on_store(self.store.exists(layout.blob(d)), self.blobs.local(d)):
                self.store.upload(layout.blob(d), self.blobs.local(d))
        checkpoint("after-blobs")
        name, version = record["name"], record["version"]
        for _ in range(MAX_CREATE_TRIES):
            doc = {**record, "version": version}
            try:
                self.store.create(layout.manifest(name, version), layout.dumps(doc))
                break
            except PreconditionFailed:
                version += 1
        else:  # pragma: no cover
            raise ConflictError(f"could not allocate a version number for {name} on {self.url}")
        for d in digests:  # a gc that ran between our check and our create: put it back
            if self.store.exists(layout.blob(d)) is None:
                self.store.upload(layout.blob(d), self.blobs.local(d))
        checkpoint("after-manifest")
        return doc

    # ------------------------------------------------------------------ tags
    def _cas(self, key: str, data: bytes, etag: str | None, what: str) -> str:
        try:
            if etag:
                return self.store.update(key, data, etag)
            return self.store.create(key, data)
        except PreconditionFailed:
            self.sync(force=True)
            raise ConflictError(
                f"{what} was changed by another writer after this command read it; nothing "
                "was overwritten: check `adaptr list`, then run the command again"
            ) from None

    def tag(self, ref: str | Ref, tag: str, *, expect: int | None | object = ANY) -> AdapterVersion:
        """Move ``NAME@tag`` from where this registry last read it (within the TTL) to ``ref``:
        refused (ConflictError) if another writer moved it since, or (``expect``) if it is
        not on the version the caller read."""
        check_tag(tag)
        self.store.check()  # a write: an unreachable store is an error, not a note
        row = self._resolve_row(ref)
        name, version = row["name"], row["version"]
        etag = self._state.tag_etag(name, tag)
        if expect is not ANY:  # as this replica has it; the store's CAS below does the rest
            hit = self._state.tags.get(layout.tag(name, tag))
            check_expected(name, tag, hit[1] if hit else None, expect)
        try:
            self._cas(layout.tag(name, tag), layout.TagDoc(version).encode(), etag, f"{name}@{tag}")
        except ConflictError:
            now = self._state.tags.get(layout.tag(name, tag))
            where = f"{name}@{now[1]}" if now and now[1] is not None else "nowhere"
            raise ConflictError(
                f"{name}@{tag} was moved by another writer (it is on {where} now) after this "
                f"command read it; nothing was overwritten: run it again to move it to "
                f"{name}@{version}"
            ) from None
        self.sync(force=True)
        return self.get(f"{name}@{version}")

    def untag(self, name: str, tag: str) -> None:
        check_name(name)
        self.sync(force=True)
        hit = self._state.tags.get(layout.tag(name, tag))
        if not hit or hit[1] is None:
            raise NotFoundError(f"{name} has no tag {tag!r}")
        self._cas(layout.tag(name, tag), layout.TagDoc(None).encode(), hit[0], f"{name}@{tag}")
        self.sync(force=True)

    def switch(self, *refs: str) -> tuple[str, list[str]]:
        if not refs:
            raise InvalidInputError("switch needs at least one adapter reference")
        parsed = [Ref.parse(r) for r in refs]
        self.sync(force=True)
        base = common_base([self._resolve_row(r) for r in parsed])
        self._set_active(base, [str(r) for r in parsed])
        return base, [str(r) for r in parsed]

    def _set_active(self, base: str, refs: list[str]) -> None:
        key = layout.active(base)
        hit = self._state.active.get(key)
        self._cas(
            key,
            layout.ActiveDoc(refs).encode(),
            hit[0] if hit else None,
            f"the active adapters of {base or '(no base)'}",
        )
        self.sync(force=True)

    def deactivate(self, base: str) -> None:
        self.sync(force=True)
        self._set_active(base, [])

    # -------------------------------------------------------------------- rm
    def remove(
        self, ref: str | Ref, *, force: bool = False, all_versions: bool = False
    ) -> list[AdapterVersion]:
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        self.sync(force=True)
        victims = self._victims(self._conn(), r, force=force, all_versions=all_versions)
        for v in victims:
            key = layout.manifest(v.name, v.version)
            tomb = layout.dumps(
                {"name": v.name, "version": v.version, "removed": True, "at": time.time()}
            )
            for _ in range(3):
                etag = self._state.manifests.get(key) or self.store.head(key).etag
                try:
                    self.store.update(key, tomb, etag)
                    break
                except PreconditionFailed:  # only a tombstone can replace a manifest
                    self._state.manifests.pop(key, None)
            for t in v.tags:
                hit = self._state.tags.get(layout.tag(v.name, t))
                if hit and hit[1] == v.version:
                    with suppress(PreconditionFailed):  # moved meanwhile: on another version
                        self.store.update(
                            layout.tag(v.name, t), layout.TagDoc(None).encode(), hit[0]
                        )
        self.sync(force=True)
        for base, refs in self.active().items():
            conn = self._conn()
            keep = [x for x in refs if resolves(conn, x, self._unknown)]
            if keep != refs:
                with suppress(ConflictError):  # switched meanwhile; dangling refs are skipped
                    self._set_active(base, keep)
        return victims

    # ----------------------------------------------------------------- evals
    def add_evals(self, records: Sequence[tuple[str | Ref, dict]]) -> list[dict]:
        self.sync(force=True)
        rows = [self._resolve_row(ref) for ref, _ in records]
        out, created = [], []
        try:
            for name, version, rec in stamped(rows, records):
                stamp = f"{int(rec['created'] * 1000):015d}-{secrets.token_hex(4)}.json"
                key = layout.evals_prefix(name, version) + stamp
                self.store.create(key, layout.dumps(rec))
                created.append(key)
                out.append((name, version, stamp, rec))
        except BaseException:
            for key in created:  # all of them or none
                self.store.delete(key)
            raise
        for name, version, stamp, rec in out:
            write_json(self.journal.evals_dir(name, version) / stamp, rec, sync_dir=False)
        return [rec for *_, rec in out]

    def evals(self, ref: str | Ref) -> list[dict]:
        v = self.get(ref)
        folder = self.journal.evals_dir(v.name, v.version)
        try:
            listed = self.store.list(layout.evals_prefix(v.name, v.version))
        except Unreachable:
            listed = []
        for m in listed:
            dest = folder / m.key.rpartition("/")[2]
            if not dest.exists():
                try:
                    write_json(dest, json.loads(self.store.get(m.key)[0]), sync_dir=False)
                except (NotFound, ValueError):
                    continue
        return self.journal.evals(v.name, v.version)

    # ----------------------------------------------------------------- bases
    def add_base(self, name: str, path: str | Path, *, force: bool = False) -> BaseRecord:
        found, info = model_folder(name, path)
        key = layout.base(name)
        doc = layout.BaseDoc(name, info.fingerprint, info.summary(), time.time())
        try:
            data, meta = self.store.get(key)
            old = layout.BaseDoc.decode(data)
        except NotFound:
            old, meta = None, None
        if old is None:
            self._cas(key, doc.encode(), None, f"base {name}")
        elif old.fingerprint != info.fingerprint:
            if not force:
                raise ConflictError(
                    f"base {name} on {self.url} has fingerprint {old.fingerprint[:12]}…, and "
                    f"{found} has {info.fingerprint[:12]}…: another model; bind another name, "
                    "or pass --force to make this model the base (adapters on the old one will "
                    "then be refused on it)"
                )
            self._cas(key, doc.encode(), meta.etag, f"base {name}")
        with self._locked():
            bindings = load_bindings(self.home)
            bindings[name] = {"path": str(found), "fingerprint": info.fingerprint}
            write_json(self.home / BINDINGS, bindings)
        self.sync(force=True)
        return self.get_base(name)

    def bases(self) -> list[BaseRecord]:
        self.sync(force=False)
        bound = {b.name: b for b in super().bases()}
        for name, doc in self._state.store_bases().items():
            if name not in bound:
                bound[name] = BaseRecord(name, "", doc.fingerprint, doc.summary, doc.created)
        return [bound[n] for n in sorted(bound)]

    def get_base(self, name: str) -> BaseRecord:
        self.sync(force=False)
        doc = self._state.store_bases().get(name)
        if doc is not None and self._base_row(name) is None:
            raise NotFoundError(
                f"base {name} is registered on {self.url} (fingerprint {doc.fingerprint[:12]}…) "
                f"but not bound on this machine: run `adaptr base add {name} PATH` with its folder here"
            )
        rec = super().get_base(name)
        self._check_binding(name, rec.fingerprint)
        return rec

    def _check_binding(self, name: str, local: str) -> None:
        doc = self._state.store_bases().get(name)
        if doc is not None and doc.fingerprint != local:
            bound = load_bindings(self.home).get(name, {}).get("path", "?")
            raise IncompatibleBaseError(
                f"base {name} on {self.url} has fingerprint {doc.fingerprint[:12]}…, and its "
                f"folder on this machine ({bound}) has {local[:12]}…: adapters trained on the "
                f"one are refused on the other; bind the right folder with `adaptr base add {name} PATH`"
            )

    def base_path(self, key: str) -> str:
        self.sync(force=False)
        if key in self._state.store_bases():
            return self.get_base(key).path
        return super().base_path(key)

    # ----------------------------------------------------------- maintenance
    def gc(self, *, grace: float | None = None):
        """Delete unreferenced blobs from the store (see ``gc.py``), then from the replica."""
        from adaptr.registry.remote.gc import store_gc

        self.sync(force=True)
        report = store_gc(self.store, grace)
        local = super().gc()  # the replica's cache: what no version it lists uses
        local.blobs_removed, local.bytes_freed = report.blobs_removed, report.bytes_freed
        local.store = report  # markers reaped, blobs kept young (tests and --json read it)
        return local

    def verify(self, ref: str | Ref | None = None):
        """Every referenced blob fetched (hash-checked) from the store, then re-hashed in the
        replica, and the replica checked as a local home is."""
        self.sync(force=True)
        return super().verify(ref)

    def _check_blob(self, f) -> str | None:
        from adaptr.errors import IntegrityError

        try:
            if not self.blobs.fetch(f.sha256):
                return f"missing from {self.url}"
        except IntegrityError:
            return f"corrupt on {self.url} (its bytes are not its SHA-256)"
        return super()._check_blob(f)

    def reindex(self, *, force: bool = False) -> RebuildReport:
        """Rebuild the replica from the store (the store itself is never rewritten)."""
        with self._locked():
            self._drop_conn()
            for p in (
                "registry.db",
                "registry.db-wal",
                "registry.db-shm",
                "remote-state.json",
                "state.json",
            ):
                (self.home / p).unlink(missing_ok=True)
            import shutil

            shutil.rmtree(self.home / "manifests", ignore_errors=True)
            self.sync(force=True)
        conn = self._conn()
        return RebuildReport(
            versions=conn.execute("SELECT COUNT(*) FROM versions").fetchone()[0],
            tags=conn.execute("SELECT COUNT(*) FROM tags").fetchone()[0],
            bases=conn.execute("SELECT COUNT(*) FROM bases").fetchone()[0],
        )


@contextmanager
def _null():
    yield


__all__ = ["RemoteRegistry", "StoreError", "cache_home"]
