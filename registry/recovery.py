"""Rebuilding the index: ``reindex`` builds a new ``registry.db`` beside the old one and swaps
it in only when it is complete.

A crash or a full disk during the build leaves the old index as it was. Every process
notices the swapped file by its identity before its next read or write (``Registry._conn``),
so none commits into, or serves from, the index that was replaced.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from pathlib import Path

from adaptr.errors import IntegrityError, NotFoundError
from adaptr.registry import index
from adaptr.registry.blobs import fsync_dir
from adaptr.registry.faults import storage_errors
from adaptr.registry.journal import manifest_problem, rebuild, record_of, state_of, write_json
from adaptr.registry.models import RebuildReport

DB = "registry.db"
SIDE_FILES = ("-wal", "-shm")


def _readable_index(db: Path) -> sqlite3.Connection | None:
    """The current index when it opens and holds adapters (to repair manifests and state
    from), else None."""
    try:
        conn = index.connect(db, create=False)
    except IntegrityError:
        return None
    if conn is None:
        return None
    try:
        if conn.execute("SELECT 1 FROM names LIMIT 1").fetchone():
            return conn
    except sqlite3.Error:
        pass
    conn.close()
    return None


def _remove_db(path: Path) -> None:
    for suffix in ("", *SIDE_FILES):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def swap_in(new: Path, db: Path) -> Path | None:
    """Put the complete index ``new`` at ``db``; the old one (with its WAL) is kept aside.

    The old file gets a second name first, then its WAL and shared-memory files follow it
    (SQLite would otherwise replay the old WAL onto the new file), then one rename
    replaces ``db``: at no instant is there no index at ``db``.
    """
    aside = None
    if db.exists():
        aside = db.with_name(f"{DB}.old-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}")
        try:
            os.link(db, aside)
        except OSError:  # no hard links here: a brief moment without an index instead
            os.replace(db, aside)
        for suffix in SIDE_FILES:
            side = Path(f"{db}{suffix}")
            if side.exists():
                os.replace(side, f"{aside}{suffix}")
    os.replace(new, db)
    fsync_dir(db.parent)
    return aside


class Recovery:
    """Mixed into :class:`Registry`: ``reindex`` and the repairs it makes on the way."""

    def reindex(self, *, force: bool = False) -> RebuildReport:
        """Rebuild the index from the version manifests and ``state.json``.

        Damaged or missing manifests of versions the current index still lists are first
        rewritten from it; a damaged ``state.json`` is replaced by the current index's
        tags, active adapters and bases, and refused when neither can be read (``force``
        rebuilds without them; version numbers stay unique either way). The old
        ``registry.db`` is kept beside the new one, never deleted.
        """
        if not self.journal.exists():
            raise NotFoundError(
                f"{self.home} has no version manifests to rebuild from (a registry made by an "
                "adaptr older than manifests, or not a registry home); nothing was changed"
            )
        db = self.home / DB
        with self._locked(), storage_errors(self.home, "rebuilding the index"):
            self._drop_conn()
            old = _readable_index(db)
            try:
                repaired = self._repair_manifests(old) if old is not None else []
                state, problem = self.journal.read_state()
                if problem and old is not None:
                    state = state_of(old)
                    problem += "; tags, active adapters and bases were taken from the old index"
                elif problem and not force:
                    raise IntegrityError(
                        f"{problem}, and the old index cannot be read either: the tags, active "
                        "adapters and bases it held cannot be restored; nothing was changed. Pass "
                        "--force to rebuild the versions without them"
                    )
            finally:
                if old is not None:
                    old.close()
            new = db.with_name(f".{DB}.rebuild-{os.getpid()}-{secrets.token_hex(4)}")
            try:
                conn = index.connect(new, create=True)
                try:
                    with index.transaction(conn):
                        report = rebuild(
                            conn, self.journal, lambda d: self.blobs.path(d).is_file(), state
                        )
                        self._prune_active(conn)
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                finally:
                    conn.close()  # the last connection: SQLite folds the WAL in and removes it
                aside = swap_in(new, db)
            except BaseException:
                _remove_db(new)
                raise
            conn = self._conn(create=True)
            self.journal.settle(conn)
            self.journal.write_state(conn)
        report.repaired, report.state_problem = repaired, problem
        report.moved_aside = str(aside) if aside else None
        return report

    def _repair_manifests(self, old: sqlite3.Connection) -> list[str]:
        """Rewrite, from a readable index, the manifests of its versions that are missing or
        damaged on disk (never one that is whole); returns the refs repaired."""
        repaired = []
        for row in old.execute("SELECT * FROM versions ORDER BY name, version").fetchall():
            path = self.journal.committed(row["name"], row["version"])
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
                whole = manifest_problem(doc, row["name"], str(row["version"])) is None
            except (OSError, ValueError):
                whole = False
            if whole or self.journal.has_intent(row["name"], row["version"]):
                continue
            rec = record_of(old, row)
            if manifest_problem(rec, row["name"], str(row["version"])) is None:
                write_json(path, rec)
                repaired.append(f"{row['name']}@{row['version']}")
        return repaired
