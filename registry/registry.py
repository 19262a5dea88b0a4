"""The adapter registry: named, versioned, tagged LoRA adapters on base models.

Layout of a registry home::

    registry.db            SQLite index (WAL): names, versions, files, tags, active, bases
    blobs/sha256/ab/…      content-addressed, read-only adapter files
    tmp/                   staging for writes in progress
    lock                   the writer lock

Every write stages its files, fsyncs and renames them into ``blobs/``, then commits one
SQL transaction under the writer lock: a crash at any instant leaves the whole version
or none of it. Unreferenced blobs (from a crash, ``rm``) are dropped by :meth:`gc`.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from adaptr.errors import IntegrityError, InvalidInputError, NotFoundError
from adaptr.registry import adding, bases, index, resolve, tags
from adaptr.registry.adapter_dir import lora_modules
from adaptr.registry.blobs import BlobStore
from adaptr.registry.evals import stamped
from adaptr.registry.faults import storage_errors
from adaptr.registry.journal import Journal
from adaptr.registry.lock import writer_lock
from adaptr.registry.maintenance import Maintenance
from adaptr.registry.models import AdapterVersion, BaseRecord
from adaptr.registry.recovery import Recovery
from adaptr.registry.refs import Ref, check_name, check_tag
from adaptr.registry.tags import ANY


def default_home() -> Path:
    """``$ADAPTR_HOME``, else ``~/.adaptr``."""
    return Path(os.environ.get("ADAPTR_HOME") or Path.home() / ".adaptr").expanduser()


class Registry(Recovery, Maintenance):
    """A registry home. Safe to share between threads and processes."""

    def __new__(cls, home: str | Path | None = None, *args, **kwargs):
        """``Registry("s3://BUCKET/PREFIX")`` (or ``$ADAPTR_HOME`` so set) opens the store."""
        if cls is Registry:
            from adaptr.registry.remote import remote_class

            cls = remote_class(home) or cls
        return super().__new__(cls)

    def __init__(self, home: str | Path | None = None):
        self.home = Path(home).expanduser() if home else default_home()
        self.blobs = BlobStore(self.home)
        self.journal = Journal(self.home)
        self._local = threading.local()
        self.created = False  # whether a write of this object made the registry home

    def __repr__(self) -> str:
        return f"Registry({str(self.home)!r})"

    # ----------------------------------------------------------------- plumbing
    def _conn(self, create: bool = False) -> sqlite3.Connection | None:
        """This thread's connection to the index, reopened when ``registry.db`` was replaced.

        A cached connection keeps reading (and writing) the file it opened even after
        ``reindex`` swapped a new index in or someone deleted it: the file's identity
        (device, inode) is checked before every use, so no process commits into a file that
        is no longer the index, nor serves from one.
        """
        db = self.home / "registry.db"
        conn = getattr(self._local, "conn", None)
        if conn is not None and index.identity(db) != self._local.identity:
            self._drop_conn()
            conn = None
        if conn is None:
            conn = index.connect(db, create=create)
            if not create:
                self._refuse_lost_index(conn)
            self._local.conn = conn
            self._local.identity = index.identity(db) if conn is not None else None
        return conn

    def close(self) -> None:
        """Close this thread's connection to the index (the next use opens it again)."""
        self._drop_conn()

    def _drop_conn(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._local.identity = None

    def index_lost(self, conn: sqlite3.Connection | None) -> str | None:
        """Why the index cannot be trusted to be complete, or None.

        An index with no adapter names (missing, emptied, recreated) while the store holds
        version manifests, or blobs from before manifests existed, has lost its records.
        """
        if conn is not None and conn.execute("SELECT 1 FROM names LIMIT 1").fetchone():
            return None
        manifests = len(self.journal.committed_paths())
        if manifests > 0:
            what = f"{manifests} version manifest(s)"
        elif not self.journal.exists() and next(self.blobs.digests(), None) is not None:
            what = f"{sum(1 for _ in self.blobs.digests())} stored file(s)"
        else:
            return None
        state = "is missing" if conn is None else "holds no adapters"
        return (
            f"the registry index {self.home / 'registry.db'} {state} but {self.home} holds {what}: "
            "the index was lost or replaced; nothing was changed. Run `adaptr reindex` to rebuild it "
            "from the stored manifests"
        )

    def _refuse_lost_index(self, conn: sqlite3.Connection | None) -> None:
        why = self.index_lost(conn)
        if why:
            if conn is not None:
                conn.close()
                if getattr(self._local, "conn", None) is conn:
                    self._local.conn = None  # the next call opens (and checks) the index again
            raise IntegrityError(why)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the writer lock, waiting up to ``$ADAPTR_LOCK_TIMEOUT`` seconds (600) for it."""
        self.home.mkdir(parents=True, exist_ok=True)
        timeout = float(os.environ.get("ADAPTR_LOCK_TIMEOUT", "600"))
        with writer_lock(self.home / "lock", timeout):
            yield

    def require(self) -> None:
        """Refuse (NotFoundError) a home that holds no registry, as every write but storing
        one does: a mistyped --home is said, not silently made."""
        if not (self.home / "registry.db").exists():
            self._refuse_lost_index(None)  # files without their index: that is said first
            raise NotFoundError(
                f"no registry at {self.home.resolve()}: add an adapter first, or pass "
                "--home (or set ADAPTR_HOME) to the registry you mean"
            )

    @contextmanager
    def _writer(
        self, *, creates: bool = False, notes: list[str] | None = None
    ) -> Iterator[sqlite3.Connection]:
        """Hold the writer lock; yields a connection to an index that exists and can be trusted.

        Only writes that store something (``creates``) make a new registry home, and say
        so (:attr:`created`, and in ``notes``); the others refuse a home that holds no
        registry. Before the write: intents of writers that died are settled, and a registry
        made before manifests existed gets them. After a committed write: ``state.json``.
        """
        if not (self.home / "registry.db").exists():
            if not creates:
                self.require()
            self._refuse_lost_index(None)
            if not self.home.exists():
                self.created = True
                if notes is not None:
                    notes.append(f"created a new registry at {self.home.resolve()}")
        with self._locked(), storage_errors(self.home, "writing to the registry"):
            conn = self._conn(create=True)
            self._refuse_lost_index(conn)
            if self.journal.exists():
                self.journal.settle(conn)
            else:
                self.journal.backfill(conn)
            yield conn
            self.journal.write_state(conn)

    def writer(self, *, creates: bool = False) -> AbstractContextManager[sqlite3.Connection]:
        """The writer lock and a connection to a trusted index, for a write of the index made
        outside this class (a copy between homes); ``creates`` as for an add."""
        return self._writer(creates=creates)

    def _rows(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        conn = self._conn()
        return conn.execute(sql, args).fetchall() if conn else []

    # --------------------------------------------------------------- resolving
    def _resolve_row(self, ref: str | Ref, conn: sqlite3.Connection | None = None) -> sqlite3.Row:
        return resolve.resolve_row(conn or self._conn(), ref, self._unknown)

    def _unknown(self, name: str, conn: sqlite3.Connection | None) -> NotFoundError:
        return resolve.unknown_adapter(name, conn, self.home)

    def _load(
        self, rows: list[sqlite3.Row], conn: sqlite3.Connection, lineage: bool = True
    ) -> list[AdapterVersion]:
        return resolve.load_versions(rows, conn, self._unknown, lineage)

    # ------------------------------------------------------------------- reads
    def get(self, ref: str | Ref) -> AdapterVersion:
        """The version a reference names (``NAME``, ``NAME@N``, ``NAME@TAG``)."""
        row = self._resolve_row(ref)
        return self._load([row], self._conn())[0]

    def list(self, name: str | None = None, *, lineage: bool = True) -> list[AdapterVersion]:
        """Every stored version (of ``name`` only, if given), by name then version.

        ``lineage=False`` leaves each version's lineage empty (not decoded): for listings of
        many trained versions, whose log histories are most of their records."""
        conn = self._conn()
        if conn is None:
            if name:
                raise self._unknown(name, None)
            return []
        if name is not None:
            check_name(name)
            rows = conn.execute(
                "SELECT * FROM versions WHERE name=? ORDER BY version", (name,)
            ).fetchall()
            if not rows:
                raise self._unknown(name, conn)
        else:
            rows = conn.execute("SELECT * FROM versions ORDER BY name, version").fetchall()
        return self._load(rows, conn, lineage)

    def path(self, ref: str | Ref) -> dict[str, Path]:
        """The stored files of a version: relative name -> read-only blob path.

        Paths are not checked: to load or serve a file use :meth:`read_checked`, or
        :meth:`check_files` before handing the paths to another program.
        """
        v = self.get(ref)
        return {f.path: self.blobs.path(f.sha256) for f in v.files}

    def read_checked(self, version: AdapterVersion, path: str) -> bytes:
        """The bytes of one stored file of ``version``, refused (IntegrityError) unless they
        hash to the digest recorded for it."""
        f = next((f for f in version.files if f.path == path), None)
        if f is None:
            raise NotFoundError(f"{version.ref} has no stored file {path}")
        return self.blobs.read_checked(f.sha256, f"{version.ref}/{f.path}")

    def check_files(self, version: AdapterVersion) -> None:
        """Refuse (IntegrityError) a version any of whose stored files is missing or is not
        the content its digest names; re-hashed only when a file changed since its last check
        in this process."""
        for f in version.files:
            if not self.blobs.intact(f.sha256):
                state = "missing from" if not self.blobs.path(f.sha256).is_file() else "corrupt in"
                raise IntegrityError(
                    f"{version.ref}/{f.path} is {state} the store (its SHA-256 is not its "
                    "name); nothing was loaded: run `adaptr verify`"
                )

    def active(self, base: str | None = None) -> dict[str, list[str]]:
        """Active adapter references per base (``""`` is the key for adapters with no base)."""
        act = resolve.active_refs(self._conn())
        return {base: act.get(base, [])} if base is not None else act

    # ------------------------------------------------------------------ writes

    # ------------------------------------------------------------------ writes
    def add(
        self,
        name: str,
        source: str | Path,
        *,
        base: str | None = None,
        tags: Sequence[str] = (),
        lineage: dict | None = None,
        metrics: dict | None = None,
        origin: str | None = None,
        allow_large: bool = False,
    ) -> AdapterVersion:
        """Store the PEFT adapter folder ``source`` as the next version of ``name``.

        ``origin`` describes where it came from when the folder is temporary (training,
        composing); by default it is the folder's path. ``allow_large`` lifts the size
        limits on the folder's files. The returned record carries what the add had to say
        (:attr:`AdapterVersion.notes`: skipped files, an unchecked base, a repeat…).
        """
        check_name(name)
        for t in tags:
            check_tag(t)
        notes: list[str] = []
        planned = adding.plan(
            self._rows, source, base, notes, lineage=lineage, origin=origin, allow_large=allow_large
        )
        with self._writer(creates=True, notes=notes) as conn:
            adding.check_one_base(conn, name, planned.base_key, planned.fingerprint)
            adapter, stored = adding.store_files(self.blobs, planned.adapter, allow_large, notes)
            same = adding.same_content(conn, name, stored)
            record = adding.version_record(name, planned, adapter, stored, metrics)
            version = adding.commit(conn, self.journal, record, tags, self._publish)
        if same is not None:
            notes.append(adding.same_content_note(f"{name}@{version}", same))
        added = self.get(f"{name}@{version}")
        adding.announce(self, added, notes)
        added.skipped, added.warnings = tuple(planned.adapter.skipped), tuple(notes)
        return added

    def _publish(self, record: dict) -> dict:
        """Where a version about to be committed becomes visible beyond this home: the record
        with its final number. A local home has nothing to do; a remote one uploads its
        blobs and creates the manifest on the store."""
        return record

    def _base_row(self, name: str) -> sqlite3.Row | None:
        return bases.base_row(self._rows, name)

    def tag(self, ref: str | Ref, tag: str, *, expect: int | None | object = ANY) -> AdapterVersion:
        """Point ``NAME@tag`` at the version ``ref`` names (moving it if it exists).

        ``expect``: the version the tag must still be on (None: not set) for the move to
        happen, else ConflictError and nothing moves — a gate that read the tag before moving
        it (:func:`adaptr.evaluation.promote`) moves it in one step with what it checked.
        """
        check_tag(tag)
        with self._writer() as conn, index.transaction(conn):
            row = self._resolve_row(ref, conn)
            tags.move_tag(conn, row, tag, expect)
        return self.get(f"{row['name']}@{row['version']}")

    def add_evals(self, records: Sequence[tuple[str | Ref, dict]]) -> list[dict]:
        """Append evaluation records (``(ref, record)`` pairs) to their versions.

        Each record is one file written whole (temp + fsync + rename) beside the version's
        manifest and never rewritten: evaluating again adds a record. The refs are resolved
        first, under the writer lock, so an unknown one stores nothing.
        """
        with self._writer() as conn:
            out = stamped([self._resolve_row(ref, conn) for ref, _ in records], records)
            self.journal.add_evals(out)  # all of them or none
        return [rec for _, _, rec in out]

    def evals(self, ref: str | Ref) -> list[dict]:
        """The evaluation records of a version, oldest first."""
        v = self.get(ref)
        return self.journal.evals(v.name, v.version)

    def untag(self, name: str, tag: str) -> None:
        """Remove tag ``tag`` from adapter ``name``."""
        check_name(name)
        with self._writer() as conn, index.transaction(conn):
            tags.delete_tag(conn, name, tag)

    def switch(self, *refs: str) -> tuple[str, list[str]]:
        """Make ``refs`` the active adapters of their (common) base; returns (base, refs)."""
        if not refs:
            raise InvalidInputError("switch needs at least one adapter reference")
        parsed = [str(Ref.parse(r)) for r in refs]
        with self._writer() as conn, index.transaction(conn):
            base = tags.common_base([self._resolve_row(r, conn) for r in parsed])
            tags.set_active(conn, base, parsed)
        return base, parsed

    def deactivate(self, base: str) -> None:
        """Clear the active adapters of ``base`` (it then runs bare)."""
        with self._writer() as conn, index.transaction(conn):
            tags.set_active(conn, base, [])

    def remove(
        self, ref: str | Ref, *, force: bool = False, all_versions: bool = False
    ) -> list[AdapterVersion]:
        """Remove one version (or every version with ``all_versions``); returns what was removed.

        A version a tag or an active reference points at needs ``force``; its tags go with it.
        Files stay until :meth:`gc`, so the removal itself is one transaction.
        """
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        with self._writer() as conn:
            victims = self._victims(conn, r, force=force, all_versions=all_versions)
            tags.remove_versions(conn, self.journal, victims, self._unknown)
        return victims

    def _victims(
        self, conn: sqlite3.Connection, r: Ref, *, force: bool, all_versions: bool
    ) -> list[AdapterVersion]:
        return tags.victims(conn, r, self._unknown, force=force, all_versions=all_versions)

    def _prune_active(self, conn: sqlite3.Connection) -> None:
        tags.prune_active(conn, self._unknown)

    # ------------------------------------------------------------------ bases
    def add_base(self, name: str, path: str | Path, *, force: bool = False) -> BaseRecord:
        """Register a local model folder (or a cached Hub id) as base ``name``."""
        found, info = bases.model_folder(name, path)
        with self._writer(creates=True) as conn, index.transaction(conn):
            bases.register(conn, name, path, found, info, force=force)
        return self.get_base(name)

    def bases(self) -> list[BaseRecord]:
        """Every registered base."""
        return bases.all_bases(self._rows)

    def get_base(self, name: str) -> BaseRecord:
        row = self._base_row(name)
        if row is None:
            raise bases.unknown_base(name)
        return bases.record(row)

    def base_path(self, key: str) -> str:
        """A loadable path or Hub id for a base key (a registered name, a path, or an id)."""
        row = self._base_row(key)
        return row["path"] if row else key


__all__ = ["Registry", "default_home", "lora_modules"]
