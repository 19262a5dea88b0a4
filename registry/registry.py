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

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from adaptr.errors import (
    ConflictError,
    IncompatibleBaseError,
    IntegrityError,
    InterruptedAfterStore,
    InvalidAdapterError,
    InvalidInputError,
    NotFoundError,
    PluginError,
)
from adaptr.registry import index
from adaptr.registry.adapter_dir import (
    CONFIG,
    WEIGHTS,
    AdapterSource,
    inspect_adapter,
    lora_modules,
    saved_tensors,
)
from adaptr.registry.blobs import BlobStore, SourceChanged, hash_file
from adaptr.registry.faults import storage_errors
from adaptr.registry.fingerprint import BaseInfo, check_adapter_fits, find_base_dir, read_base
from adaptr.registry.journal import Journal, insert_version
from adaptr.registry.lock import writer_lock
from adaptr.registry.maintenance import Maintenance
from adaptr.registry.models import AdapterVersion, BaseRecord, StoredFile
from adaptr.registry.patterns import check_patterns, module_names_of
from adaptr.registry.recovery import Recovery
from adaptr.registry.refs import Ref, check_name, check_tag
from adaptr.registry.safetensors_header import write_renamed


def _recheck(checked: AdapterSource, staged: Path, allow_large: bool) -> AdapterSource:
    """Inspect the staged copy; refuse it unless it holds what the source was checked to hold.

    The source folder can change between its check and its copy (another process saving
    into it): only the copy's own bytes are stored, so only they are trusted.
    """
    changed = f"{checked.root} changed while it was being added"
    try:
        copy = inspect_adapter(staged, allow_large=allow_large)
    except InvalidInputError as e:
        raise InvalidAdapterError(f"{changed} ({e}); nothing was stored: add it again") from None
    if copy.config != checked.config or copy.tensors != checked.tensors or copy.renames:
        what = "config" if copy.config != checked.config else "tensor names or shapes"
        raise InvalidAdapterError(
            f"{changed} (its {what} differ from what was checked); nothing was stored: "
            "add it again once nothing is writing to it"
        )
    copy.root = checked.root
    return copy


def _renamed_note(adapter: AdapterSource) -> str:
    old, new = (k.split(".") for k in next(iter(adapter.renames.items())))
    same = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), len(new))
    start = max(same - 2, 0)  # from the module's name on
    example = (
        f"{'…' * (start > 0)}{'.'.join(old[start:])} -> {'…' * (start > 0)}{'.'.join(new[start:])}"
    )
    names = f" (it carried the adapter name {', '.join(map(repr, adapter.adapter_names))})"
    return (
        f"stored {WEIGHTS} with {len(adapter.renames)} of {len(adapter.tensors)} tensor names "
        f"as save_pretrained writes them, e.g. {example}{names if adapter.adapter_names else ''}; "
        "the values are unchanged"
    )


ANY = object()  # Registry.tag's expect: wherever the tag is


def check_expected(name: str, tag: str, now: int | None, expect: int | None) -> None:
    """Refuse (ConflictError) a tag move when the tag is no longer where its caller read it."""
    if now != expect:
        where = f"{name}@{now}" if now is not None else "nowhere"
        was = f"{name}@{expect}" if expect is not None else "not set"
        raise ConflictError(
            f"{name}@{tag} moved while this command checked it (it was {was}, it is on "
            f"{where} now); nothing was moved: run the command again"
        )


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
        self.notes: list[str] = []  # warnings from the last write (skipped files, unknown base…)

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
    def _writer(self, *, creates: bool = False) -> Iterator[sqlite3.Connection]:
        """Hold the writer lock; yields a connection to an index that exists and can be trusted.

        Only writes that store something (``creates``) make a new registry home, and say
        so in :attr:`notes`; the others refuse a home that holds no registry. Before the
        write: intents of writers that died are settled, and a registry made before
        manifests existed gets them. After a committed write: ``state.json``.
        """
        if not (self.home / "registry.db").exists():
            if not creates:
                self.require()
            self._refuse_lost_index(None)
            if not self.home.exists():
                self.notes.append(f"created a new registry at {self.home.resolve()}")
        with self._locked(), storage_errors(self.home, "writing to the registry"):
            conn = self._conn(create=True)
            self._refuse_lost_index(conn)
            if self.journal.exists():
                self.journal.settle(conn)
            else:
                self.journal.backfill(conn)
            yield conn
            self.journal.write_state(conn)

    def _rows(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        conn = self._conn()
        return conn.execute(sql, args).fetchall() if conn else []

    # --------------------------------------------------------------- resolving
    def _resolve_row(self, ref: str | Ref, conn: sqlite3.Connection | None = None) -> sqlite3.Row:
        r = ref if isinstance(ref, Ref) else Ref.parse(ref)
        conn = conn or self._conn()
        if conn is None:
            raise self._unknown(r.name, [])
        if r.tag is not None:
            hit = conn.execute(
                "SELECT version FROM tags WHERE name=? AND tag=?", (r.name, r.tag)
            ).fetchone()
            if hit is None:
                tags = [
                    t[0]
                    for t in conn.execute(
                        "SELECT tag FROM tags WHERE name=? ORDER BY tag", (r.name,)
                    )
                ]
                if not tags and not self._has_versions(conn, r.name):
                    raise self._unknown(r.name, conn)
                listed = ", ".join(tags) if tags else "none"
                raise NotFoundError(
                    f"{r.name} has no tag {r.tag!r} (tags: {listed}); add one with `adaptr tag`"
                )
            version = hit[0]
        else:
            version = r.version
        if version is None:
            row = conn.execute(
                "SELECT * FROM versions WHERE name=? ORDER BY version DESC LIMIT 1", (r.name,)
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT * FROM versions WHERE name=? AND version=?", (r.name, version)
            ).fetchone()
        if row is None:
            if not self._has_versions(conn, r.name):
                raise self._unknown(r.name, conn)
            have = [
                str(v[0])
                for v in conn.execute(
                    "SELECT version FROM versions WHERE name=? ORDER BY version", (r.name,)
                )
            ]
            raise NotFoundError(f"{r.name} has no version {version} (versions: {', '.join(have)})")
        return row

    @staticmethod
    def _has_versions(conn: sqlite3.Connection, name: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM versions WHERE name=? LIMIT 1", (name,)).fetchone()
            is not None
        )

    def _unknown(self, name: str, conn) -> NotFoundError:
        """Names the home it looked in: a wrong ADAPTR_HOME is the usual cause."""
        import difflib

        names = [r[0] for r in conn.execute("SELECT DISTINCT name FROM versions")] if conn else []
        close = difflib.get_close_matches(name, names, n=1)
        home = self.home.resolve()
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif not home.exists():
            hint = (
                "there is no registry there; pass --home (or set ADAPTR_HOME) to the one you mean"
            )
        else:
            hint = "run `adaptr list` to see the registered adapters"
        return NotFoundError(f"unknown adapter {name!r} in {home}: {hint}")

    def _load(
        self, rows: list[sqlite3.Row], conn: sqlite3.Connection, lineage: bool = True
    ) -> list[AdapterVersion]:
        """Turn version rows into records with their files, tags and active flag."""
        out = [AdapterVersion.from_row(r, lineage=lineage) for r in rows]
        if not out:
            return out
        by_id = {r["id"]: v for r, v in zip(rows, out, strict=True)}
        by_key = {(v.name, v.version): v for v in out}
        ids = ",".join(str(i) for i in by_id)
        for f in conn.execute(f"SELECT * FROM files WHERE version_id IN ({ids}) ORDER BY path"):
            by_id[f["version_id"]].files.append(StoredFile(f["path"], f["sha256"], f["size"]))
        for t in conn.execute("SELECT name, tag, version FROM tags ORDER BY tag"):
            v = by_key.get((t["name"], t["version"]))
            if v:
                v.tags.append(t["tag"])
        for refs in self._active(conn).values():
            for ref in refs:
                try:
                    row = self._resolve_row(ref, conn)
                except NotFoundError:
                    continue
                v = by_key.get((row["name"], row["version"]))
                if v:
                    v.active = True
        return out

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

    @staticmethod
    def _active(conn: sqlite3.Connection | None) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        if conn is None:
            return out
        for row in conn.execute("SELECT base, ref FROM active ORDER BY base, position"):
            out.setdefault(row["base"], []).append(row["ref"])
        return out

    def active(self, base: str | None = None) -> dict[str, list[str]]:
        """Active adapter references per base (``""`` is the key for adapters with no base)."""
        act = self._active(self._conn())
        return {base: act.get(base, [])} if base is not None else act

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
        limits on the folder's files.
        """
        check_name(name)
        for t in tags:
            check_tag(t)
        adapter = inspect_adapter(source, allow_large=allow_large)  # refused before any copy
        self.notes = [f"skipped {s}" for s in adapter.skipped]
        declared = adapter.config.get("base_model_name_or_path")
        base_key, fingerprint, base_info = self._attach_base(base, declared)
        if base_info is not None:
            check_patterns(
                adapter.config, module_names_of(base_info.tensors), str(adapter.root / CONFIG)
            )
            check_adapter_fits(
                adapter.lora_modules,
                base_info,
                f"adapter {adapter.root}",
                saved_tensors(adapter.tensors) if adapter.config.get("peft_type") == "LORA" else {},
                adapter.config.get("modules_to_save"),
            )
        if base and declared and not self._same_model(declared, base, base_key, base_info):
            where = base_key
            if base_info is not None and str(base_info.path) != base_key:
                where = f"{base_key} ({base_info.path})"
            self.notes.append(
                f"the adapter config says it was trained on {declared!r}, and it is added to base "
                f"{where}, another model"
                + (" with the same shapes" if base_info else "")
                + ": check that this is the base it was trained on"
            )
        if adapter.renames:
            self.notes.append(_renamed_note(adapter))
        lineage = {**(lineage or {}), "source": origin or str(adapter.root.resolve())}
        if base_key is not None:
            lineage.setdefault("base", base_key)
            lineage.setdefault("base_fingerprint", fingerprint)
        with self._writer(creates=True) as conn:
            self._check_one_base(conn, name, base_key, fingerprint)
            adapter, stored = self._store_files(adapter, allow_large)
            summary = adapter.summary()
            same = self._same_content(conn, name, stored)
            pending = None
            try:
                with index.transaction(conn):
                    row = conn.execute(
                        "SELECT next_version FROM names WHERE name=?", (name,)
                    ).fetchone()
                    # past any number the journal holds too (an index that lost its counter)
                    version = max(row[0] if row else 1, self.journal.highest(name) + 1)
                    record = {
                        "name": name, "version": version, "created": time.time(), "base": base_key,
                        "base_fingerprint": fingerprint, "peft_type": summary.get("peft_type"),
                        "r": summary.get("r"), "size": sum(s for _, _, s in stored),
                        "summary": summary, "config": adapter.config, "lineage": lineage,
                        "metrics": metrics or {}, "source": lineage["source"],
                        "files": [{"path": n, "sha256": d, "size": z} for n, d, z in stored],
                    }  # fmt: skip
                    record = self._publish(record)  # a store allocates its number here
                    version = record["version"]
                    pending = self.journal.begin_add(record)
                    insert_version(conn, record)
                    conn.executemany(
                        "INSERT OR REPLACE INTO tags(name, tag, version) VALUES (?,?,?)",
                        [(name, t, version) for t in tags],
                    )
            except BaseException:
                if pending is not None:
                    pending.unlink(missing_ok=True)
                raise
            self.journal.place(pending, name, version)
        if same is not None:
            ref, identical = same
            what = "identical to" if identical else "the same weights and config as"
            other = "" if identical else " (other files differ)"
            self.notes.append(
                f"{name}@{version} is {what} {ref}{other}; stored anyway: `adaptr rm "
                f"{name}@{version}` removes it if you did not mean to add it again"
            )
        added = self.get(f"{name}@{version}")
        self._announce(added)
        return added

    def _publish(self, record: dict) -> dict:
        """Where a version about to be committed becomes visible beyond this home: the record
        with its final number. A local home has nothing to do; a remote one uploads its
        blobs and creates the manifest on the store."""
        return record

    def _store_files(
        self, adapter: AdapterSource, allow_large: bool
    ) -> tuple[AdapterSource, list[tuple[str, str, int]]]:
        """Copy the adapter's files into the blob store (under the writer lock); returns the
        staged copy's inspection and (name, digest, size) of each file.

        Each copy is checked to be one whole state of its source, and the copies together to
        hold the tensors checked before (base fit included), or nothing is stored.
        """
        stage = self.blobs.tmp / f"add-{os.getpid()}-{secrets.token_hex(6)}"
        stage.mkdir(parents=True)
        try:
            stored = []
            for f in adapter.files:
                try:
                    digest, size = self.blobs.stage(f, stage / f.name)
                except SourceChanged:
                    raise InvalidAdapterError(
                        f"{adapter.root} changed while it was being added ({f.name} was "
                        "rewritten during its copy); nothing was stored: add it again once "
                        "nothing is writing to it"
                    ) from None
                if f.name == WEIGHTS and adapter.renames:  # stored as save_pretrained spells it
                    raw = stage / f".{f.name}.source"
                    os.replace(stage / f.name, raw)
                    write_renamed(raw, stage / f.name, adapter.renames)
                    raw.unlink()
                    digest, size = hash_file(stage / f.name)
                stored.append((f.name, digest, size))
            adapter = _recheck(adapter, stage, allow_large)
            for fname, digest, size in stored:
                if self.blobs.adopt(stage / fname, digest, size):
                    self.notes.append(
                        f"the stored copy of {fname} ({digest[:12]}…) was corrupt; this "
                        "add replaced it with the intact content"
                    )
        finally:  # empty once adopted; a failed add leaves its copies here
            for leftover in stage.iterdir():
                leftover.unlink()
            stage.rmdir()
        return adapter, stored

    @staticmethod
    def _same_content(
        conn: sqlite3.Connection, name: str, stored: list[tuple[str, str, int]]
    ) -> tuple[str, bool] | None:
        """A stored version with this content: (its ref, whether every file is identical, or
        only the config and weights); one of ``name`` first, then the newest."""
        files = {path: digest for path, digest, _ in stored}
        if WEIGHTS not in files or CONFIG not in files:
            return None
        rows = conn.execute(
            "SELECT v.name, v.version, f.path, f.sha256 FROM versions v JOIN files f ON f.version_id = v.id "
            "WHERE v.id IN (SELECT version_id FROM files WHERE path=? AND sha256=?)",
            (WEIGHTS, files[WEIGHTS]),
        ).fetchall()
        found: dict[tuple[str, int], dict[str, str]] = {}
        for row in rows:
            found.setdefault((row["name"], row["version"]), {})[row["path"]] = row["sha256"]
        matches = [
            (key, have == files) for key, have in found.items() if have.get(CONFIG) == files[CONFIG]
        ]
        if not matches:
            return None
        (other, version), identical = max(matches, key=lambda m: (m[1], m[0][0] == name, m[0][1]))
        return f"{other}@{version}", identical

    def _same_model(
        self, declared: str, base: str, base_key: str | None, info: BaseInfo | None
    ) -> bool:
        """Whether the model an adapter config names is the base it is added to: the same
        name, Hub id or folder. (Not the fingerprint: a fine-tune has its model's shapes.)"""

        def norm(text) -> str:
            return str(text).strip().rstrip("/").casefold()

        names = {base, base_key}
        if info is not None:
            names |= {str(info.path), info.config.get("_name_or_path")}
            parts = Path(info.path).parts  # a Hub cache snapshot: …/models--org--name/snapshots/…
            names |= {
                p[len("models--") :].replace("--", "/") for p in parts if p.startswith("models--")
            }
        names = {norm(n) for n in names if n}
        if norm(declared) in names:
            return True
        rec = self._base_row(declared)
        found = Path(rec["path"]) if rec is not None else find_base_dir(declared)
        if found is not None and info is not None and found.resolve() == Path(info.path).resolve():
            return True
        # trained on a local copy of a Hub model (or the reverse): the same last name
        tail = norm(declared).rpartition("/")[2]
        return bool(tail) and tail in {n.rpartition("/")[2] for n in names}

    @staticmethod
    def _check_one_base(
        conn: sqlite3.Connection, name: str, base: str | None, fingerprint: str | None
    ) -> None:
        """A name keeps one base, so ``NAME`` and ``NAME@tag`` never change base under a user."""
        for row in conn.execute(
            "SELECT DISTINCT base, base_fingerprint FROM versions WHERE name=?", (name,)
        ):
            same_model = fingerprint is not None and row["base_fingerprint"] == fingerprint
            if row["base"] != base and not same_model:
                raise IncompatibleBaseError(
                    f"{name} holds versions on base {row['base'] or '(none recorded)'}, and this "
                    f"adapter is on {base or '(none recorded)'}: a name keeps one base; add it "
                    f"under another name (or pass --base {row['base']} if that is its base)"
                )

    def _announce(self, version: AdapterVersion) -> None:
        """Tell plugins (``adaptr_version_added``); a failing plugin is noted, never undoes the add."""
        from adaptr.extend.manager import event_hook

        try:
            event_hook().adaptr_version_added(registry=self, version=version)
        except InterruptedAfterStore:
            raise  # names the plugin already
        except PluginError as e:  # names the plugin and what to do
            self.notes.append(f"{e}; {version.ref} is stored")
        except KeyboardInterrupt as e:  # still stops the caller, saying the version is stored
            raise InterruptedAfterStore(version.ref, "a plugin's adaptr_version_added") from e
        except BaseException as e:  # SystemExit too: a plugin never ends the add
            self.notes.append(
                f"a plugin's adaptr_version_added failed ({type(e).__name__}: {e}); {version.ref} is stored"
            )

    def _attach_base(
        self, base: str | None, declared: str | None
    ) -> tuple[str | None, str | None, BaseInfo | None]:
        """Resolve an adapter's base to (key, fingerprint, readable base or None)."""
        from adaptr.errors import brief

        wanted = base or declared
        if not wanted:
            self.notes.append("no base recorded: the adapter config names none; pass --base")
            return None, None, None
        rec = self._base_row(wanted)
        if rec is not None:
            path = Path(rec["path"])
            info = read_base(path) if (path / "config.json").is_file() else None
            if info is None:
                self.notes.append(
                    f"base {rec['name']} is registered at {path}, which is gone: shapes not checked"
                )
            elif info.fingerprint != rec["fingerprint"]:
                raise IntegrityError(
                    f"base {rec['name']} at {path} changed since it was registered (fingerprint differs); "
                    f"re-register it with `adaptr base add {rec['name']} PATH --force`"
                )
            return rec["name"], rec["fingerprint"], info
        found = find_base_dir(wanted)
        if found is None:
            local = Path(wanted).expanduser()
            if base and (local.exists() or wanted.startswith((".", "/", "~"))):
                raise NotFoundError(
                    f"base {brief(wanted)} is not a model folder (no config.json); give a model folder, "
                    "a Hub id in the local cache, or a name from `adaptr base list`"
                )
            if base and "/" not in wanted:  # registered names have no '/'; Hub ids mostly do
                import difflib

                names = [r["name"] for r in self._rows("SELECT name FROM bases")]
                close = difflib.get_close_matches(wanted.lower(), names, n=1, cutoff=0.8)
                if close:
                    raise NotFoundError(
                        f"unknown base {brief(wanted)}: did you mean {close[0]!r}? "
                        "(`adaptr base list` shows the registered bases; for another model give its folder)"
                    )
            if base:
                self.notes.append(
                    f"base {brief(wanted)} is not registered, not a local folder and not in the Hugging Face "
                    "cache: recorded as a Hub id by name, shapes not checked"
                )
            else:
                self.notes.append(
                    f"base {brief(wanted)} (from the adapter config) is not available locally: "
                    "recorded by name, shapes not checked"
                )
            return wanted, None, None
        info = read_base(found)
        for row in self._rows("SELECT name, fingerprint FROM bases"):
            if row["fingerprint"] == info.fingerprint:
                return row["name"], info.fingerprint, info
        key = str(found) if Path(wanted).expanduser().exists() else wanted
        return key, info.fingerprint, info

    def _base_row(self, name: str) -> sqlite3.Row | None:
        rows = self._rows("SELECT * FROM bases WHERE name=?", (name,))
        return rows[0] if rows else None

    def tag(self, ref: str | Ref, tag: str, *, expect: int | None | object = ANY) -> AdapterVersion:
        """Point ``NAME@tag`` at the version ``ref`` names (moving it if it exists).

        ``expect``: the version the tag must still be on (None: not set) for the move to
        happen, else ConflictError and nothing moves — a gate that read the tag before moving
        it (:func:`adaptr.evaluation.promote`) moves it in one step with what it checked.
        """
        check_tag(tag)
        with self._writer() as conn, index.transaction(conn):
            row = self._resolve_row(ref, conn)
            if expect is not ANY:
                now = conn.execute(
                    "SELECT version FROM tags WHERE name=? AND tag=?", (row["name"], tag)
                ).fetchone()
                check_expected(row["name"], tag, now[0] if now else None, expect)
            conn.execute(
                "INSERT OR REPLACE INTO tags(name, tag, version) VALUES (?,?,?)",
                (row["name"], tag, row["version"]),
            )
        return self.get(f"{row['name']}@{row['version']}")

    def add_evals(self, records: Sequence[tuple[str | Ref, dict]]) -> list[dict]:
        """Append evaluation records (``(ref, record)`` pairs) to their versions.

        Each record is one file written whole (temp + fsync + rename) beside the version's
        manifest and never rewritten: evaluating again adds a record. The refs are resolved
        first, under the writer lock, so an unknown one stores nothing.
        """
        with self._writer() as conn:
            rows = [self._resolve_row(ref, conn) for ref, _ in records]
            out = []
            for row, (_, record) in zip(rows, records, strict=True):
                rec = {**record, "ref": f"{row['name']}@{row['version']}"}
                rec.setdefault("created", time.time())
                out.append((row["name"], row["version"], rec))
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
            if conn.execute("DELETE FROM tags WHERE name=? AND tag=?", (name, tag)).rowcount == 0:
                raise NotFoundError(f"{name} has no tag {tag!r}")

    def switch(self, *refs: str) -> tuple[str, list[str]]:
        """Make ``refs`` the active adapters of their (common) base; returns (base, refs)."""
        if not refs:
            raise InvalidInputError("switch needs at least one adapter reference")
        parsed = [Ref.parse(r) for r in refs]
        with self._writer() as conn, index.transaction(conn):
            rows = [self._resolve_row(r, conn) for r in parsed]
            bases = {row["base"] or "" for row in rows}
            if len(bases) > 1:
                raise IncompatibleBaseError(
                    f"cannot activate adapters of different bases together ({', '.join(sorted(bases))}); "
                    "switch each base separately"
                )
            (base,) = bases
            conn.execute("DELETE FROM active WHERE base=?", (base,))
            conn.executemany(
                "INSERT INTO active(base, position, ref) VALUES (?,?,?)",
                [(base, i, str(r)) for i, r in enumerate(parsed)],
            )
        return base, [str(r) for r in parsed]

    def deactivate(self, base: str) -> None:
        """Clear the active adapters of ``base`` (it then runs bare)."""
        with self._writer() as conn, index.transaction(conn):
            conn.execute("DELETE FROM active WHERE base=?", (base,))

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
            moved: list[tuple[Path, str, int]] = []
            try:
                with index.transaction(conn):
                    for v in victims:
                        conn.execute(
                            "DELETE FROM tags WHERE name=? AND version=?", (v.name, v.version)
                        )
                        conn.execute(
                            "DELETE FROM versions WHERE name=? AND version=?", (v.name, v.version)
                        )
                        intent = self.journal.begin_remove(v.name, v.version)
                        if intent is not None:
                            moved.append((intent, v.name, v.version))
                    self._prune_active(conn)
            except BaseException:
                self.journal.abort_remove(moved)
                raise
            self.journal.finish_remove(moved)
        return victims

    def _victims(
        self, conn: sqlite3.Connection, r: Ref, *, force: bool, all_versions: bool
    ) -> list[AdapterVersion]:
        """The versions ``remove(r)`` would remove, refused (nothing removed) when the ref is
        ambiguous, or when a tag or the active state holds one and ``force`` is not given."""
        if all_versions:
            if r.version or r.tag:
                raise InvalidInputError(
                    f"--all removes every version of a name: give {r.name}, not {r}"
                )
            rows = conn.execute(
                "SELECT * FROM versions WHERE name=? ORDER BY version", (r.name,)
            ).fetchall()
            if not rows:
                raise self._unknown(r.name, conn)
        else:
            row = self._resolve_row(r, conn)
            count = conn.execute(
                "SELECT COUNT(*) FROM versions WHERE name=?", (r.name,)
            ).fetchone()[0]
            if r.version is None and r.tag is None and count > 1:
                raise InvalidInputError(
                    f"{r.name} has {count} versions: remove one with {r.name}@N, or all with --all"
                )
            rows = [row]
        victims = self._load(rows, conn)
        held = [v for v in victims if v.tags or v.active]
        if held and not force:
            why = "; ".join(
                f"{v.ref} is "
                + " and ".join(
                    (["tagged " + ", ".join(v.tags)] if v.tags else [])
                    + (["active"] if v.active else [])
                )
                for v in held
            )
            raise ConflictError(f"{why}: pass --force to remove it anyway (its tags go with it)")
        return victims

    def _prune_active(self, conn: sqlite3.Connection) -> None:
        """Drop active references that no longer resolve, keeping the rest in order."""
        for base, refs in self._active(conn).items():
            keep = []
            for ref in refs:
                try:
                    self._resolve_row(ref, conn)
                    keep.append(ref)
                except NotFoundError:
                    pass
            if keep != refs:
                conn.execute("DELETE FROM active WHERE base=?", (base,))
                conn.executemany(
                    "INSERT INTO active(base, position, ref) VALUES (?,?,?)",
                    [(base, i, r) for i, r in enumerate(keep)],
                )

    # ------------------------------------------------------------------ bases
    def add_base(self, name: str, path: str | Path, *, force: bool = False) -> BaseRecord:
        """Register a local model folder (or a cached Hub id) as base ``name``."""
        check_name(name, "base name")
        found = find_base_dir(str(path))
        if found is None:
            raise NotFoundError(
                f"no model folder at {path} (no config.json): give a local model folder or a Hub id in the local cache"
            )
        info = read_base(found)
        with self._writer(creates=True) as conn, index.transaction(conn):
            old = conn.execute("SELECT fingerprint FROM bases WHERE name=?", (name,)).fetchone()
            if old and old[0] != info.fingerprint and not force:
                raise ConflictError(
                    f"base {name} is registered with a different model; pass --force to replace it"
                )
            conn.execute(
                "INSERT OR REPLACE INTO bases(name, path, fingerprint, summary, created) VALUES (?,?,?,?,?)",
                (name, str(found), info.fingerprint, json.dumps(info.summary()), time.time()),
            )
            # adapters recorded against this folder by path now name the base
            for alias in {str(found), str(path)} - {name}:
                conn.execute("UPDATE versions SET base=? WHERE base=?", (name, alias))
                conn.execute("UPDATE active SET base=? WHERE base=?", (name, alias))
        return self.get_base(name)

    def bases(self) -> list[BaseRecord]:
        """Every registered base."""
        return [self._base_record(r) for r in self._rows("SELECT * FROM bases ORDER BY name")]

    def get_base(self, name: str) -> BaseRecord:
        row = self._base_row(name)
        if row is None:
            raise NotFoundError(
                f"unknown base {name!r}: register it with `adaptr base add {name} PATH`"
            )
        return self._base_record(row)

    @staticmethod
    def _base_record(row: sqlite3.Row) -> BaseRecord:
        return BaseRecord(
            row["name"], row["path"], row["fingerprint"], json.loads(row["summary"]), row["created"]
        )

    def base_path(self, key: str) -> str:
        """A loadable path or Hub id for a base key (a registered name, a path, or an id)."""
        row = self._base_row(key)
        return row["path"] if row else key


__all__ = ["Registry", "default_home", "lora_modules"]
