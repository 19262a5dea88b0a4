"""Bringing the local replica up to date with the store.

One pass lists ``versions/``, ``tags/``, ``active/`` and ``bases/`` (a LIST page holds
1,000 keys), GETs only the objects whose ETag differs from the one seen last time (kept in
``remote-state.json``), and applies the difference to the replica's SQLite index and
manifests in one transaction, the way ``journal.insert_version``/``rebuild`` build them.
A tag is applied only when its version exists; a tombstoned manifest removes its version.
"""

from __future__ import annotations

import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from adaptr.registry import index
from adaptr.registry.journal import Journal, insert_version, manifest_problem, write_json
from adaptr.registry.remote import layout
from adaptr.registry.remote.store import Meta, NotFound, ObjectStore

STATE = "remote-state.json"
BINDINGS = "bindings.json"  # base name -> {path, fingerprint} on this machine only


@dataclass
class SyncState:
    """What the replica last saw of the store: ETags per key, the docs of tags and bases."""

    manifests: dict[str, str] = field(default_factory=dict)  # key -> etag
    removed: list[str] = field(default_factory=list)  # refs whose manifest is a tombstone
    tags: dict[str, list] = field(default_factory=dict)  # key -> [etag, version or None]
    active: dict[str, list] = field(default_factory=dict)  # key -> [etag, refs]
    bases: dict[str, list] = field(default_factory=dict)  # key -> [etag, BaseDoc dict]

    @classmethod
    def load(cls, home: Path) -> SyncState:
        try:
            doc = json.loads((home / STATE).read_text(encoding="utf-8"))
            return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
        except (OSError, ValueError, TypeError):
            return cls()

    def save(self, home: Path) -> None:
        write_json(home / STATE, asdict(self), sync_dir=False)

    def tag_etag(self, name: str, tag: str) -> str | None:
        hit = self.tags.get(layout.tag(name, tag))
        return hit[0] if hit else None

    def store_bases(self) -> dict[str, layout.BaseDoc]:
        return {
            doc["name"]: layout.BaseDoc(**doc)
            for _, doc in self.bases.values()
            if isinstance(doc, dict) and "name" in doc
        }


def load_bindings(home: Path) -> dict[str, dict]:
    try:
        doc = json.loads((home / BINDINGS).read_text(encoding="utf-8"))
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def _fetch(store: ObjectStore, metas: list[Meta]) -> dict[str, tuple[bytes, str] | None]:
    """GET each object (16 at a time); None for one gone meanwhile."""

    def one(m: Meta):
        try:
            data, meta = store.get(m.key)
            return m.key, (data, meta.etag)
        except NotFound:
            return m.key, None

    if len(metas) <= 1:
        return dict(one(m) for m in metas)
    with ThreadPoolExecutor(16) as pool:
        return dict(pool.map(one, metas))


def _changed(listed: list[Meta], known: dict[str, list] | dict[str, str]) -> list[Meta]:
    out = []
    for m in listed:
        seen = known.get(m.key)
        etag = seen if isinstance(seen, str) else (seen[0] if seen else None)
        if etag != m.etag:
            out.append(m)
    return out


def _json(data: bytes):
    try:
        return json.loads(data)
    except ValueError:
        return None


def pull(store: ObjectStore, conn: sqlite3.Connection, journal: Journal, home: Path) -> SyncState:
    """One sync pass (the caller holds the replica's writer lock)."""
    state = SyncState.load(home)
    listed = {p: store.list(p) for p in (layout.VERSIONS, layout.TAGS, layout.ACTIVE, layout.BASES)}
    manifests = [m for m in listed[layout.VERSIONS] if layout.parse_manifest_key(m.key)]
    fresh = _fetch(store, _changed(manifests, state.manifests))
    gone = {k for k in state.manifests if k not in {m.key for m in manifests}}
    tags = _fetch(store, _changed(listed[layout.TAGS], state.tags))
    active = _fetch(store, _changed(listed[layout.ACTIVE], state.active))
    bases = _fetch(store, _changed(listed[layout.BASES], state.bases))
    with index.transaction(conn):
        _apply_versions(conn, journal, state, fresh, gone)
        _apply_tags(conn, state, listed[layout.TAGS], tags)
        _apply_active(conn, state, listed[layout.ACTIVE], active)
        _apply_bases(conn, state, listed[layout.BASES], bases, load_bindings(home))
    state.save(home)
    journal.write_state(conn)
    return state


def _apply_versions(conn, journal: Journal, state: SyncState, fresh: dict, gone: set[str]) -> None:
    removed = set(state.removed)
    for key, got in sorted(fresh.items()):
        name, version = layout.parse_manifest_key(key)  # type: ignore[misc]
        doc = _json(got[0]) if got else None
        if got is None or layout.is_tombstone(doc):
            _drop(conn, journal, name, version)
            removed.add(f"{name}@{version}")
            state.manifests[key] = got[1] if got else ""
            continue
        if manifest_problem(doc, name, str(version)) is not None:
            continue  # not whole: retried next pass (its ETag is not recorded)
        have = conn.execute(
            "SELECT 1 FROM versions WHERE name=? AND version=?", (name, version)
        ).fetchone()
        if not have:
            write_json(journal.committed(name, version), doc, sync_dir=False)
            insert_version(conn, doc)
        state.manifests[key] = got[1]
    for key in gone:
        name, version = layout.parse_manifest_key(key)  # type: ignore[misc]
        _drop(conn, journal, name, version)
        state.manifests.pop(key, None)
    state.removed = sorted(removed)


def _drop(conn, journal: Journal, name: str, version: int) -> None:
    conn.execute("DELETE FROM tags WHERE name=? AND version=?", (name, version))
    conn.execute("DELETE FROM versions WHERE name=? AND version=?", (name, version))
    conn.execute(
        "INSERT INTO names(name, next_version) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
        "next_version=max(next_version, excluded.next_version)",
        (name, version + 1),
    )
    path = journal.committed(name, version)
    if path.exists() or not journal.tombstone(name, version).exists():
        write_json(
            journal.tombstone(name, version), {"name": name, "version": version}, sync_dir=False
        )
        path.unlink(missing_ok=True)


def _apply_tags(conn, state: SyncState, listed: list[Meta], fetched: dict) -> None:
    for key, got in fetched.items():
        if got is not None:
            state.tags[key] = [got[1], layout.TagDoc.decode(got[0]).version]
    present = {m.key for m in listed}
    for key in [k for k in state.tags if k not in present]:
        del state.tags[key]
    conn.execute("DELETE FROM tags")
    for key, (_, version) in state.tags.items():
        parsed = layout.parse_tag_key(key)
        if parsed is None or version is None:
            continue
        name, tag = parsed
        if conn.execute(
            "SELECT 1 FROM versions WHERE name=? AND version=?", (name, version)
        ).fetchone():
            conn.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (name, tag, version))


def _apply_active(conn, state: SyncState, listed: list[Meta], fetched: dict) -> None:
    for key, got in fetched.items():
        if got is not None:
            state.active[key] = [got[1], layout.ActiveDoc.decode(got[0]).refs]
    present = {m.key for m in listed}
    for key in [k for k in state.active if k not in present]:
        del state.active[key]
    conn.execute("DELETE FROM active")
    for key, (_, refs) in state.active.items():
        base = layout.active_base(key)
        conn.executemany(
            "INSERT OR REPLACE INTO active(base, position, ref) VALUES (?,?,?)",
            [(base, i, r) for i, r in enumerate(refs)],
        )


def _apply_bases(conn, state: SyncState, listed: list[Meta], fetched: dict, bindings) -> None:
    for key, got in fetched.items():
        doc = _json(got[0]) if got else None
        if isinstance(doc, dict) and {"name", "fingerprint"} <= set(doc):
            state.bases[key] = [got[1], asdict(layout.BaseDoc.decode(got[0]))]
    present = {m.key for m in listed}
    for key in [k for k in state.bases if k not in present]:
        del state.bases[key]
    conn.execute("DELETE FROM bases")
    for name, doc in state.store_bases().items():
        bound = bindings.get(name)
        if not isinstance(bound, dict) or "path" not in bound:
            continue
        conn.execute(
            "INSERT OR REPLACE INTO bases(name, path, fingerprint, summary, created) "
            "VALUES (?,?,?,?,?)",
            (name, bound["path"], bound.get("fingerprint") or doc.fingerprint,
             json.dumps(doc.summary), doc.created),
        )  # fmt: skip
