"""The SQLite index: names, versions, files, tags, active adapters and bases.

Opened in WAL mode with full fsync, so readers never block the writer and a committed
transaction survives a crash. Writers go through :func:`transaction` under the file lock.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adaptr.errors import IntegrityError
from adaptr.registry.faults import full_error, is_full

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL REFERENCES names(name),
    version INTEGER NOT NULL,
    created REAL NOT NULL,
    base TEXT,
    base_fingerprint TEXT,
    peft_type TEXT,
    r INTEGER,
    size INTEGER NOT NULL,
    summary TEXT NOT NULL,
    config TEXT NOT NULL,
    lineage TEXT NOT NULL,
    metrics TEXT NOT NULL,
    source TEXT,
    UNIQUE (name, version)
);
CREATE TABLE IF NOT EXISTS files (
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    PRIMARY KEY (version_id, path)
);
CREATE INDEX IF NOT EXISTS files_sha256 ON files(sha256);
CREATE TABLE IF NOT EXISTS tags (
    name TEXT NOT NULL,
    tag TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, tag)
);
CREATE TABLE IF NOT EXISTS active (
    base TEXT NOT NULL,
    position INTEGER NOT NULL,
    ref TEXT NOT NULL,
    PRIMARY KEY (base, position)
);
CREATE TABLE IF NOT EXISTS bases (
    name TEXT PRIMARY KEY,
    path TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    summary TEXT NOT NULL,
    created REAL NOT NULL
);
"""


def identity(db: Path) -> tuple[int, int] | None:
    """(device, inode) of the index file, None when it is missing: a replaced index differs."""
    try:
        st = db.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def connect(db: Path, create: bool) -> sqlite3.Connection | None:
    """Open the index; with ``create`` make it (and its schema) if missing, else return None."""
    if not create and not db.exists():
        return None
    conn = sqlite3.connect(db, isolation_level=None, timeout=60.0, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA synchronous = FULL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == SCHEMA_VERSION:
            conn.execute("SELECT 1 FROM names LIMIT 1").fetchall()
    except sqlite3.DatabaseError as e:
        conn.close()
        if is_full(e, db.parent):
            raise full_error(db.parent, "opening the registry index") from None
        if getattr(e, "sqlite_errorname", "SQLITE_CORRUPT") not in (
            "SQLITE_CORRUPT",
            "SQLITE_NOTADB",
        ):
            raise IntegrityError(
                f"the registry index {db} cannot be read now ({e}); nothing was changed: check "
                "the file system (permissions, a network mount), then run the command again"
            ) from None
        raise IntegrityError(
            f"the registry index {db} is unreadable ({e}); the adapter files are safe in "
            f"{db.parent / 'blobs'}: run `adaptr reindex` to rebuild the index from the stored "
            "manifests (the damaged file is kept beside it)"
        ) from None
    if version > SCHEMA_VERSION:
        conn.close()
        raise IntegrityError(
            f"{db} was written by a newer adaptr (schema {version}); upgrade adaptr to read it"
        )
    if version != SCHEMA_VERSION:
        if (
            not create
        ):  # the first write never committed (e.g. killed while creating the schema): empty
            conn.close()
            return None
        conn.execute("PRAGMA journal_mode = WAL")
        with transaction(conn):
            for stmt in SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE … COMMIT``; rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
