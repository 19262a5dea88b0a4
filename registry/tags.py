"""Moving references in a local index: tags, the active adapters, and removing versions.

Each function runs inside the caller's writer (lock held, index trusted) on its connection.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from adaptr.errors import ConflictError, IncompatibleBaseError, InvalidInputError, NotFoundError
from adaptr.registry import index
from adaptr.registry.journal import Journal
from adaptr.registry.models import AdapterVersion
from adaptr.registry.refs import Ref
from adaptr.registry.resolve import Unknown, active_refs, load_versions, resolve_row, resolves

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


def move_tag(
    conn: sqlite3.Connection, row: sqlite3.Row, tag: str, expect: int | None | object
) -> None:
    """Point ``NAME@tag`` at the version ``row``, only from ``expect`` unless it is :data:`ANY`."""
    if expect is not ANY:
        now = conn.execute(
            "SELECT version FROM tags WHERE name=? AND tag=?", (row["name"], tag)
        ).fetchone()
        check_expected(row["name"], tag, now[0] if now else None, expect)
    conn.execute(
        "INSERT OR REPLACE INTO tags(name, tag, version) VALUES (?,?,?)",
        (row["name"], tag, row["version"]),
    )


def delete_tag(conn: sqlite3.Connection, name: str, tag: str) -> None:
    if conn.execute("DELETE FROM tags WHERE name=? AND tag=?", (name, tag)).rowcount == 0:
        raise NotFoundError(f"{name} has no tag {tag!r}")


def common_base(rows: list[sqlite3.Row]) -> str:
    """The one base of the versions ``rows`` (``""``: none), refused when they differ."""
    bases = {row["base"] or "" for row in rows}
    if len(bases) > 1:
        raise IncompatibleBaseError(
            f"cannot activate adapters of different bases together ({', '.join(sorted(bases))}); "
            "switch each base separately"
        )
    (base,) = bases
    return base


def set_active(conn: sqlite3.Connection, base: str, refs: list[str]) -> None:
    conn.execute("DELETE FROM active WHERE base=?", (base,))
    conn.executemany(
        "INSERT INTO active(base, position, ref) VALUES (?,?,?)",
        [(base, i, r) for i, r in enumerate(refs)],
    )


def victims(
    conn: sqlite3.Connection, r: Ref, unknown: Unknown, *, force: bool, all_versions: bool
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
            raise unknown(r.name, conn)
    else:
        row = resolve_row(conn, r, unknown)
        count = conn.execute("SELECT COUNT(*) FROM versions WHERE name=?", (r.name,)).fetchone()[0]
        if r.version is None and r.tag is None and count > 1:
            raise InvalidInputError(
                f"{r.name} has {count} versions: remove one with {r.name}@N, or all with --all"
            )
        rows = [row]
    found = load_versions(rows, conn, unknown)
    held = [v for v in found if v.tags or v.active]
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
    return found


def remove_versions(
    conn: sqlite3.Connection, journal: Journal, gone: list[AdapterVersion], unknown: Unknown
) -> None:
    """Delete ``gone`` (tags included) and the active references left dangling, in one
    transaction with their manifests' removal (undone together if it fails)."""
    moved: list[tuple[Path, str, int]] = []
    try:
        with index.transaction(conn):
            for v in gone:
                conn.execute("DELETE FROM tags WHERE name=? AND version=?", (v.name, v.version))
                conn.execute("DELETE FROM versions WHERE name=? AND version=?", (v.name, v.version))
                intent = journal.begin_remove(v.name, v.version)
                if intent is not None:
                    moved.append((intent, v.name, v.version))
            prune_active(conn, unknown)
    except BaseException:
        journal.abort_remove(moved)
        raise
    journal.finish_remove(moved)


def prune_active(conn: sqlite3.Connection, unknown: Unknown) -> None:
    """Drop active references that no longer resolve, keeping the rest in order."""
    for base, refs in active_refs(conn).items():
        keep = [ref for ref in refs if resolves(conn, ref, unknown)]
        if keep != refs:
            set_active(conn, base, keep)
