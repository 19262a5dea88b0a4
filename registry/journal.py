"""A second record of the index beside the blobs, so a lost or damaged ``registry.db`` can be rebuilt.

Layout under the registry home::

    manifests/NAME/N.json        one per committed version: its full record and files
    manifests/NAME/N.evals/*.json  evaluation records of a version, append-only
    manifests/_pending/NAME@N.json  written before the SQL commit of an add
    manifests/_removing/NAME@N.json moved there before the SQL commit of a remove
    state.json                   names (next version), tags, active adapters, bases

A writer (holding the lock) moves a pending manifest to ``NAME/N.json`` after its
commit and deletes a removing one after its commit. A writer killed in between leaves an
intent that the next lock holder settles against the index (:func:`settle`). ``state.json``
is rewritten after every committed write. Every file goes through temp + fsync + rename.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from .blobs import fsync_dir
from .models import RebuildReport

MANIFESTS = "manifests"
STATE = "state.json"
PENDING, REMOVING = "_pending", "_removing"  # "_" cannot start an adapter name
_VERSION_COLUMNS = (
    "name", "version", "created", "base", "base_fingerprint", "peft_type", "r", "size",
    "summary", "config", "lineage", "metrics", "source",
)  # fmt: skip
_JSON_COLUMNS = ("summary", "config", "lineage", "metrics")


def write_json(path: Path, doc: object, *, sync_dir: bool = True) -> None:
    """Write ``doc`` to ``path`` atomically (temp file, fsync, rename, and with ``sync_dir``
    fsync the folder, so the rename itself survives a crash)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        with open(part, "w", encoding="utf-8") as f:
            json.dump(doc, f, default=str, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


@dataclass
class Journal:
    """The manifests and state file of one registry home."""

    home: Path

    @property
    def root(self) -> Path:
        return self.home / MANIFESTS

    def exists(self) -> bool:
        return self.root.is_dir()

    def committed(self, name: str, version: int) -> Path:
        return self.root / name / f"{version}.json"

    def _intent(self, kind: str, name: str, version: int) -> Path:
        return self.root / kind / f"{name}@{version}.json"

    # ------------------------------------------------------------------ writes
    def begin_add(self, record: dict) -> Path:
        """Write the manifest of a version about to be committed; returns its pending path."""
        pending = self._intent(PENDING, record["name"], record["version"])
        write_json(pending, record)
        return pending

    def place(self, manifest: Path, name: str, version: int) -> None:
        """Move a manifest (pending, or on its way out) to its committed place.

        Not fsynced: if a crash loses the rename, the intent is still there and the next
        writer settles it the same way.
        """
        final = self.committed(name, version)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(manifest, final)

    def begin_remove(self, name: str, version: int) -> Path | None:
        src = self.committed(name, version)
        if not src.exists():
            return None
        dest = self._intent(REMOVING, name, version)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
        fsync_dir(src.parent)  # durable before the commit: a crash never shows a removed
        fsync_dir(dest.parent)  # version's manifest, nor loses a kept version's
        return dest

    def abort_remove(self, moved: list[tuple[Path, str, int]]) -> None:
        for path, name, version in moved:
            self.place(path, name, version)

    def finish_remove(self, moved: list[tuple[Path, str, int]]) -> None:
        """After the commit: the removed versions' manifests and evaluation records go."""
        for path, name, version in moved:
            path.unlink(missing_ok=True)
            shutil.rmtree(self.evals_dir(name, version), ignore_errors=True)

    def write_state(self, conn: sqlite3.Connection) -> None:
        """Snapshot names, tags, active adapters and bases (after a committed write)."""
        state = {
            "names": {r[0]: r[1] for r in conn.execute("SELECT name, next_version FROM names")},
            "tags": [list(r) for r in conn.execute("SELECT name, tag, version FROM tags")],
            "active": [list(r) for r in conn.execute("SELECT base, position, ref FROM active")],
            "bases": [
                dict(zip(("name", "path", "fingerprint", "summary", "created"), r, strict=True))
                for r in conn.execute("SELECT name, path, fingerprint, summary, created FROM bases")
            ],
        }
        write_json(self.home / STATE, state, sync_dir=False)  # a crash may leave the one before

    def backfill(self, conn: sqlite3.Connection) -> None:
        """Write manifests for every indexed version (a registry made before manifests existed)."""
        for row in conn.execute("SELECT * FROM versions").fetchall():
            write_json(self.committed(row["name"], row["version"]), record_of(conn, row))
        self.root.mkdir(parents=True, exist_ok=True)  # state.json follows the write

    def settle(self, conn: sqlite3.Connection) -> None:
        """Resolve the intents of writers that died between their manifest and their commit."""
        for kind in (PENDING, REMOVING):
            folder = self.root / kind
            if not folder.is_dir():
                continue
            for path in folder.glob("*.json"):
                name, _, version = path.stem.rpartition("@")
                indexed = conn.execute(
                    "SELECT 1 FROM versions WHERE name=? AND version=?", (name, int(version))
                ).fetchone()
                if indexed:  # the add committed, or the remove did not
                    self.place(path, name, int(version))
                else:
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ evals
    def evals_dir(self, name: str, version: int) -> Path:
        """``manifests/NAME/N.evals/``: one file per evaluation record, never rewritten."""
        return self.root / name / f"{version}.evals"

    def add_eval(self, name: str, version: int, record: dict) -> Path:
        """Append one evaluation record (temp + fsync + rename: whole or absent).

        Records live beside the version's manifest, outside the index, so ``reindex`` keeps
        them; file names sort by time and a random part keeps concurrent writers apart.
        """
        stamp = f"{int(record.get('created', 0) * 1000):015d}"
        path = self.evals_dir(name, version) / f"{stamp}-{secrets.token_hex(4)}.json"
        write_json(path, record)
        return path

    def evals(self, name: str, version: int) -> list[dict]:
        """Every readable evaluation record of a version, oldest first."""
        folder = self.evals_dir(name, version)
        out = []
        for path in sorted(folder.glob("[!.]*.json")) if folder.is_dir() else []:
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return out

    # ------------------------------------------------------------------- reads
    def manifests(self) -> list[dict]:
        """Every committed manifest that can be read (unreadable ones are skipped)."""
        out = []
        if not self.exists():
            return out
        for path in self.committed_paths():
            try:
                out.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):
                continue
        return out

    def has_manifest(self, name: str, version: int) -> bool:
        """A manifest in any state, looked for in the order writers move it (no race misses it)."""
        return any(
            p.exists()
            for p in (
                self._intent(PENDING, name, version),
                self.committed(name, version),
                self._intent(REMOVING, name, version),
            )
        )

    def committed_paths(self) -> list[Path]:
        """The manifests of committed versions (intents excluded: their folders start with _)."""
        return sorted(p for p in self.root.glob("[!_]*/*.json"))

    def state(self) -> dict:
        try:
            return json.loads((self.home / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}


def record_of(conn: sqlite3.Connection, row: sqlite3.Row) -> dict:
    """A version row and its files as a manifest."""
    rec = {c: row[c] for c in _VERSION_COLUMNS}
    for c in _JSON_COLUMNS:
        rec[c] = json.loads(rec[c])
    rec["files"] = [
        {"path": f["path"], "sha256": f["sha256"], "size": f["size"]}
        for f in conn.execute(
            "SELECT path, sha256, size FROM files WHERE version_id=?", (row["id"],)
        )
    ]
    return rec


def insert_version(conn: sqlite3.Connection, rec: dict) -> None:
    """Index one version record (a manifest): its name, row and files."""
    values = [
        json.dumps(rec[c], default=str) if c in _JSON_COLUMNS else rec[c] for c in _VERSION_COLUMNS
    ]
    conn.execute(
        "INSERT INTO names(name, next_version) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
        "next_version=max(next_version, excluded.next_version)",
        (rec["name"], rec["version"] + 1),
    )
    cur = conn.execute(
        f"INSERT INTO versions({', '.join(_VERSION_COLUMNS)}) "
        f"VALUES ({', '.join('?' * len(_VERSION_COLUMNS))})",
        values,
    )
    conn.executemany(
        "INSERT INTO files(version_id, path, sha256, size) VALUES (?,?,?,?)",
        [(cur.lastrowid, f["path"], f["sha256"], f["size"]) for f in rec["files"]],
    )


def rebuild(conn: sqlite3.Connection, journal: Journal, blob_exists) -> RebuildReport:
    """Fill an empty index from the manifests and ``state.json``; versions missing a blob are skipped."""
    report = RebuildReport()
    state = journal.state()
    for rec in journal.manifests():
        ref = f"{rec.get('name')}@{rec.get('version')}"
        try:
            missing = [f["path"] for f in rec["files"] if not blob_exists(f["sha256"])]
            if missing:
                report.skipped.append(f"{ref}: stored file(s) missing ({', '.join(missing)})")
                continue
            insert_version(conn, rec)
        except (KeyError, TypeError, sqlite3.Error) as e:
            report.skipped.append(f"{ref}: unreadable manifest ({type(e).__name__}: {e})")
            continue
        report.versions += 1
    for name, n in (state.get("names") or {}).items():  # numbers of removed versions stay used
        conn.execute(
            "INSERT INTO names(name, next_version) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
            "next_version=max(next_version, excluded.next_version)",
            (name, int(n)),
        )
    for name, tag, version in state.get("tags") or []:
        if conn.execute(
            "SELECT 1 FROM versions WHERE name=? AND version=?", (name, version)
        ).fetchone():
            conn.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (name, tag, version))
            report.tags += 1
    for base, position, ref in state.get("active") or []:
        conn.execute("INSERT OR REPLACE INTO active VALUES (?,?,?)", (base, position, ref))
    for b in state.get("bases") or []:
        conn.execute(
            "INSERT OR REPLACE INTO bases(name, path, fingerprint, summary, created) VALUES (?,?,?,?,?)",
            (b["name"], b["path"], b["fingerprint"], b["summary"], b["created"]),
        )
        report.bases += 1
    return report
