"""A second record of the index beside the blobs, so a lost or damaged ``registry.db`` can be rebuilt.

Layout under the registry home::

    manifests/NAME/N.json        one per committed version: its full record and files
    manifests/NAME/N.evals/*.json  evaluation records of a version, append-only
    manifests/NAME/N.removed     a removed version's tombstone: its number is never reused
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
import re
import secrets
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import IntegrityError
from adaptr.registry.blobs import fsync_dir
from adaptr.registry.models import RebuildReport

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
        if final.exists() and final.read_bytes() != manifest.read_bytes():
            raise IntegrityError(
                f"{final} already holds another manifest of {name}@{version}; nothing was "
                f"overwritten (the new one is kept at {manifest}): run `adaptr verify`"
            )
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
            write_json(self.tombstone(name, version), {"name": name, "version": version})
            path.unlink(missing_ok=True)
            shutil.rmtree(self.evals_dir(name, version), ignore_errors=True)

    def tombstone(self, name: str, version: int) -> Path:
        """``manifests/NAME/N.removed``: left by a remove so that N is never given out again,
        even after the index and ``state.json`` are lost."""
        return self.root / name / f"{version}.removed"

    def highest(self, name: str) -> int:
        """The highest version number of ``name`` any file of the journal holds (0 if none):
        committed, pending, being removed or removed."""
        numbers = [0]
        folder = self.root / name
        if folder.is_dir():
            for p in folder.iterdir():
                stem, _, ext = p.name.partition(".")
                if ext in ("json", "removed") and stem.isdigit():
                    numbers.append(int(stem))
        for kind in (PENDING, REMOVING):
            for p in (self.root / kind).glob(f"{name}@*.json"):
                tail = p.stem.rpartition("@")[2]
                if tail.isdigit():
                    numbers.append(int(tail))
        return max(numbers)

    def write_state(self, conn: sqlite3.Connection) -> None:
        """Snapshot names, tags, active adapters and bases (after a committed write)."""
        write_json(
            self.home / STATE, state_of(conn), sync_dir=False
        )  # a crash may leave the one before

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
        """Append one evaluation record (whole or absent), beside the version's manifest and
        outside the index, so ``reindex`` keeps it; names sort by time, a random part keeps
        concurrent writers apart."""
        return self.add_evals([(name, version, record)])[0]

    def add_evals(self, records: list[tuple[str, int, dict]]) -> list[Path]:
        """Append several evaluation records, all or none: each is written and fsynced as a
        hidden part first (where a full disk fails), then every part is renamed into place."""
        parts: list[tuple[Path, Path]] = []
        try:
            for name, version, record in records:
                stamp = f"{int(record.get('created', 0) * 1000):015d}"
                final = self.evals_dir(name, version) / f"{stamp}-{secrets.token_hex(4)}.json"
                part = final.with_name(f".{final.name}.part")
                write_json(part, record, sync_dir=False)
                parts.append((part, final))
            for part, final in parts:
                os.replace(part, final)
        except BaseException:
            for part, final in parts:
                part.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
            raise
        for folder in {final.parent for _, final in parts}:
            fsync_dir(folder)
        return [final for _, final in parts]

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
        """Every committed manifest that is whole (see :meth:`read_manifests` for the rest)."""
        return self.read_manifests()[0]

    def read_manifests(self) -> tuple[list[dict], list[Damaged]]:
        """Every committed manifest: (the whole ones, the damaged ones with what is wrong)."""
        good: list[dict] = []
        damaged: list[Damaged] = []
        if not self.exists():
            return good, damaged
        for path in self.committed_paths():
            try:
                rec = json.loads(path.read_text(encoding="utf-8"))
                problem = manifest_problem(rec, path.parent.name, path.stem)
            except (OSError, ValueError) as e:
                problem = f"unreadable ({type(e).__name__}: {str(e)[:120]})"
            if problem:
                damaged.append(Damaged(path, path.parent.name, path.stem, problem))
            else:
                good.append(rec)
        return good, damaged

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

    def has_intent(self, name: str, version: int) -> bool:
        """Whether a writer's intent (an add or remove not yet settled) names the version."""
        return any(self._intent(k, name, version).exists() for k in (PENDING, REMOVING))

    def committed_paths(self) -> list[Path]:
        """The manifests of committed versions (intents excluded: their folders start with _)."""
        return sorted(p for p in self.root.glob("[!_]*/*.json"))

    def state(self) -> dict:
        """``state.json`` when it is whole, else ``{}`` (:meth:`read_state` says why)."""
        return self.read_state()[0]

    def read_state(self) -> tuple[dict, str | None]:
        """(``state.json``'s content, None) or ({}, what is wrong with it); a missing file
        is no problem for a home that has no manifests either."""
        path = self.home / STATE
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}, (f"{path} is missing" if self.committed_paths() else None)
        except (OSError, ValueError) as e:
            return {}, f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]})"
        problem = state_problem(doc)
        return ({}, f"{path} is damaged ({problem})") if problem else (doc, None)


@dataclass
class Damaged:
    """A committed manifest that cannot be trusted: where it is and what is wrong."""

    path: Path
    name: str
    version: str  # the file's stem: a number unless the file itself is misnamed
    problem: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}: manifest {self.path} is {self.problem}"


_SHA256 = re.compile(r"[0-9a-f]{64}")


def manifest_problem(rec: object, name: str, stem: str) -> str | None:
    """What makes a parsed manifest unusable (None when it is whole)."""
    if not isinstance(rec, dict):
        return f"not a JSON object ({type(rec).__name__})"
    missing = [c for c in (*_VERSION_COLUMNS, "files") if c not in rec]
    if missing:
        return f"missing {', '.join(missing)}"
    if rec["name"] != name or str(rec["version"]) != stem or not isinstance(rec["version"], int):
        return f"for {rec['name']}@{rec['version']}, not {name}@{stem}"
    for c in _JSON_COLUMNS:
        if not isinstance(rec[c], dict):
            return f"damaged ({c} is not an object)"
    files = rec["files"]
    if not isinstance(files, list) or not files:
        return "damaged (it lists no files)"
    for f in files:
        if not (
            isinstance(f, dict)
            and isinstance(f.get("path"), str)
            and isinstance(f.get("sha256"), str)
            and _SHA256.fullmatch(f["sha256"])
            and isinstance(f.get("size"), int)
        ):
            return f"damaged (a file entry is not {{path, sha256, size}}: {str(f)[:80]})"
    return None


def state_problem(doc: object) -> str | None:
    """What makes a parsed ``state.json`` unusable (None when it is whole)."""
    if not isinstance(doc, dict):
        return f"not a JSON object ({type(doc).__name__})"
    names = doc.get("names", {})
    if not isinstance(names, dict) or not all(isinstance(n, int) for n in names.values()):
        return "names is not a map of name to next version"
    shapes = {"tags": 3, "active": 3}
    for key, width in shapes.items():
        rows = doc.get(key, [])
        if not isinstance(rows, list) or not all(
            isinstance(r, list) and len(r) == width for r in rows
        ):
            return f"{key} is not a list of {width}-item rows"
    bases = doc.get("bases", [])
    want = {"name", "path", "fingerprint", "summary", "created"}
    if not isinstance(bases, list) or not all(
        isinstance(b, dict) and want <= set(b) for b in bases
    ):
        return "bases is not a list of base records"
    return None


def state_of(conn: sqlite3.Connection) -> dict:
    """What ``state.json`` holds, read from an index: names, tags, active adapters, bases."""
    return {
        "names": {r[0]: r[1] for r in conn.execute("SELECT name, next_version FROM names")},
        "tags": [list(r) for r in conn.execute("SELECT name, tag, version FROM tags")],
        "active": [list(r) for r in conn.execute("SELECT base, position, ref FROM active")],
        "bases": [
            dict(zip(("name", "path", "fingerprint", "summary", "created"), r, strict=True))
            for r in conn.execute("SELECT name, path, fingerprint, summary, created FROM bases")
        ],
    }


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


def rebuild(conn: sqlite3.Connection, journal: Journal, blob_exists, state: dict) -> RebuildReport:
    """Fill an empty index from the manifests and ``state`` (tags, active adapters, bases).

    Versions missing a blob and damaged manifests are skipped and reported; every name's
    next version number is past every number the journal ever held (tombstones included).
    """
    report = RebuildReport()
    good, damaged = journal.read_manifests()
    report.damaged = [str(d) for d in damaged]
    names: set[str] = {d.name for d in damaged}
    for rec in good:
        ref = f"{rec['name']}@{rec['version']}"
        names.add(rec["name"])
        missing = [f["path"] for f in rec["files"] if not blob_exists(f["sha256"])]
        if missing:
            report.skipped.append(f"{ref}: stored file(s) missing ({', '.join(missing)})")
            continue
        insert_version(conn, rec)
        report.versions += 1
    if journal.exists():
        names |= {p.name for p in journal.root.iterdir() if p.is_dir() and p.name[0] != "_"}
    counters = {n: journal.highest(n) + 1 for n in names}
    for name, n in (state.get("names") or {}).items():  # numbers of removed versions stay used
        counters[name] = max(counters.get(name, 1), int(n))
    for name, n in counters.items():
        conn.execute(
            "INSERT INTO names(name, next_version) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET "
            "next_version=max(next_version, excluded.next_version)",
            (name, n),
        )
    for name, tag, version in state.get("tags") or []:
        if conn.execute(
            "SELECT 1 FROM versions WHERE name=? AND version=?", (name, version)
        ).fetchone():
            conn.execute("INSERT OR REPLACE INTO tags VALUES (?,?,?)", (name, tag, version))
            report.tags += 1
        else:
            report.skipped.append(f"tag {name}@{tag}: its version {version} is not restored")
    for base, position, ref in state.get("active") or []:
        conn.execute("INSERT OR REPLACE INTO active VALUES (?,?,?)", (base, position, ref))
    for b in state.get("bases") or []:
        conn.execute(
            "INSERT OR REPLACE INTO bases(name, path, fingerprint, summary, created) VALUES (?,?,?,?,?)",
            (b["name"], b["path"], b["fingerprint"], b["summary"], b["created"]),
        )
        report.bases += 1
    return report
