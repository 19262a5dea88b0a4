"""Reading the index: references resolved to version rows, rows turned into records."""

from __future__ import annotations

import difflib
import sqlite3
from collections.abc import Callable
from pathlib import Path

from adaptr.errors import NotFoundError
from adaptr.registry.models import AdapterVersion, StoredFile
from adaptr.registry.refs import Ref

# how a home says "no adapter of that name": (name, index or None) -> the error to raise
Unknown = Callable[[str, "sqlite3.Connection | None"], NotFoundError]


def names_like(name: str, conn: sqlite3.Connection | None) -> list[str]:
    """The stored adapter name closest to ``name`` (at most one)."""
    names = [r[0] for r in conn.execute("SELECT DISTINCT name FROM versions")] if conn else []
    return difflib.get_close_matches(name, names, n=1)


def unknown_adapter(name: str, conn: sqlite3.Connection | None, home: Path) -> NotFoundError:
    """Names the home it looked in: a wrong ADAPTR_HOME is the usual cause."""
    close = names_like(name, conn)
    home = home.resolve()
    if close:
        hint = f"did you mean {close[0]!r}?"
    elif not home.exists():
        hint = "there is no registry there; pass --home (or set ADAPTR_HOME) to the one you mean"
    else:
        hint = "run `adaptr list` to see the registered adapters"
    return NotFoundError(f"unknown adapter {name!r} in {home}: {hint}")


def has_versions(conn: sqlite3.Connection, name: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM versions WHERE name=? LIMIT 1", (name,)).fetchone() is not None
    )


def _tagged(conn: sqlite3.Connection, r: Ref, unknown: Unknown) -> int:
    """The version ``NAME@TAG`` is on, else NotFoundError listing the tags there are."""
    hit = conn.execute(
        "SELECT version FROM tags WHERE name=? AND tag=?", (r.name, r.tag)
    ).fetchone()
    if hit is not None:
        return hit[0]
    tags = [t[0] for t in conn.execute("SELECT tag FROM tags WHERE name=? ORDER BY tag", (r.name,))]
    if not tags and not has_versions(conn, r.name):
        raise unknown(r.name, conn)
    listed = ", ".join(tags) if tags else "none"
    raise NotFoundError(
        f"{r.name} has no tag {r.tag!r} (tags: {listed}); add one with `adaptr tag`"
    )


def resolve_row(conn: sqlite3.Connection | None, ref: str | Ref, unknown: Unknown) -> sqlite3.Row:
    """The index row of the version ``ref`` names (``NAME``: the newest), else NotFoundError."""
    r = ref if isinstance(ref, Ref) else Ref.parse(ref)
    if conn is None:
        raise unknown(r.name, None)
    version = _tagged(conn, r, unknown) if r.tag is not None else r.version
    if version is None:
        row = conn.execute(
            "SELECT * FROM versions WHERE name=? ORDER BY version DESC LIMIT 1", (r.name,)
        ).fetchone()
    else:
        row = conn.execute(
            "SELECT * FROM versions WHERE name=? AND version=?", (r.name, version)
        ).fetchone()
    if row is None:
        if not has_versions(conn, r.name):
            raise unknown(r.name, conn)
        have = [
            str(v[0])
            for v in conn.execute(
                "SELECT version FROM versions WHERE name=? ORDER BY version", (r.name,)
            )
        ]
        raise NotFoundError(f"{r.name} has no version {version} (versions: {', '.join(have)})")
    return row


def resolves(conn: sqlite3.Connection, ref: str, unknown: Unknown) -> bool:
    try:
        resolve_row(conn, ref, unknown)
        return True
    except NotFoundError:
        return False


def active_refs(conn: sqlite3.Connection | None) -> dict[str, list[str]]:
    """The active references per base, in order (``""``: adapters with no base)."""
    out: dict[str, list[str]] = {}
    if conn is None:
        return out
    for row in conn.execute("SELECT base, ref FROM active ORDER BY base, position"):
        out.setdefault(row["base"], []).append(row["ref"])
    return out


def load_versions(
    rows: list[sqlite3.Row], conn: sqlite3.Connection, unknown: Unknown, lineage: bool = True
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
    for refs in active_refs(conn).values():
        for ref in refs:
            try:
                row = resolve_row(conn, ref, unknown)
            except NotFoundError:
                continue
            v = by_key.get((row["name"], row["version"]))
            if v:
                v.active = True
    return out
