"""Base models in a registry: registering a model folder, looking bases up, and finding the
base an adapter is added to."""

from __future__ import annotations

import difflib
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from adaptr.errors import ConflictError, IntegrityError, NotFoundError, brief
from adaptr.registry.fingerprint import BaseInfo, find_base_dir, read_base
from adaptr.registry.models import BaseRecord
from adaptr.registry.refs import check_name

# a read of the index: (sql, args) -> rows ([] when there is no index yet)
Query = Callable[[str, Sequence], "list[sqlite3.Row]"]


def model_folder(name: str, path: str | Path) -> tuple[Path, BaseInfo]:
    """The model folder ``path`` names (a folder or a cached Hub id) and what it holds, for
    registering it as base ``name``: a bad name or no model folder is refused."""
    check_name(name, "base name")
    found = find_base_dir(str(path))
    if found is None:
        raise NotFoundError(
            f"no model folder at {path} (no config.json): give a local model folder or a Hub id in the local cache"
        )
    return found, read_base(found)


def register(
    conn: sqlite3.Connection,
    name: str,
    path: str | Path,
    found: Path,
    info: BaseInfo,
    *,
    force: bool,
) -> None:
    """Record ``found`` as base ``name`` (in the caller's transaction); adapters recorded
    against that folder by path then name the base."""
    old = conn.execute("SELECT fingerprint FROM bases WHERE name=?", (name,)).fetchone()
    if old and old[0] != info.fingerprint and not force:
        raise ConflictError(
            f"base {name} is registered with a different model; pass --force to replace it"
        )
    conn.execute(
        "INSERT OR REPLACE INTO bases(name, path, fingerprint, summary, created) VALUES (?,?,?,?,?)",
        (name, str(found), info.fingerprint, json.dumps(info.summary()), time.time()),
    )
    for alias in {str(found), str(path)} - {name}:
        conn.execute("UPDATE versions SET base=? WHERE base=?", (name, alias))
        conn.execute("UPDATE active SET base=? WHERE base=?", (name, alias))


def base_row(query: Query, name: str) -> sqlite3.Row | None:
    rows = query("SELECT * FROM bases WHERE name=?", (name,))
    return rows[0] if rows else None


def record(row: sqlite3.Row) -> BaseRecord:
    return BaseRecord(
        row["name"], row["path"], row["fingerprint"], json.loads(row["summary"]), row["created"]
    )


def all_bases(query: Query) -> list[BaseRecord]:
    return [record(r) for r in query("SELECT * FROM bases ORDER BY name", ())]


def unknown_base(name: str) -> NotFoundError:
    return NotFoundError(f"unknown base {name!r}: register it with `adaptr base add {name} PATH`")


def _registered(rec: sqlite3.Row, notes: list[str]) -> tuple[str, str, BaseInfo | None]:
    path = Path(rec["path"])
    info = read_base(path) if (path / "config.json").is_file() else None
    if info is None:
        notes.append(
            f"base {rec['name']} is registered at {path}, which is gone: shapes not checked"
        )
    elif info.fingerprint != rec["fingerprint"]:
        raise IntegrityError(
            f"base {rec['name']} at {path} changed since it was registered (fingerprint differs); "
            f"re-register it with `adaptr base add {rec['name']} PATH --force`"
        )
    return rec["name"], rec["fingerprint"], info


def _not_found(query: Query, wanted: str, base: str | None, notes: list[str]) -> None:
    """A base that is no model folder here: refused when given as a path or a near-miss of a
    registered name, else noted (it is recorded by name)."""
    local = Path(wanted).expanduser()
    if base and (local.exists() or wanted.startswith((".", "/", "~"))):
        raise NotFoundError(
            f"base {brief(wanted)} is not a model folder (no config.json); give a model folder, "
            "a Hub id in the local cache, or a name from `adaptr base list`"
        )
    if base and "/" not in wanted:  # registered names have no '/'; Hub ids mostly do
        names = [r["name"] for r in query("SELECT name FROM bases", ())]
        close = difflib.get_close_matches(wanted.lower(), names, n=1, cutoff=0.8)
        if close:
            raise NotFoundError(
                f"unknown base {brief(wanted)}: did you mean {close[0]!r}? "
                "(`adaptr base list` shows the registered bases; for another model give its folder)"
            )
    if base:
        notes.append(
            f"base {brief(wanted)} is not registered, not a local folder and not in the Hugging Face "
            "cache: recorded as a Hub id by name, shapes not checked"
        )
    else:
        notes.append(
            f"base {brief(wanted)} (from the adapter config) is not available locally: "
            "recorded by name, shapes not checked"
        )


def attach_base(
    query: Query, base: str | None, declared: str | None, notes: list[str]
) -> tuple[str | None, str | None, BaseInfo | None]:
    """Resolve an adapter's base (given, else the one its config declares) to (key,
    fingerprint, readable base or None); what could not be checked goes to ``notes``."""
    wanted = base or declared
    if not wanted:
        notes.append("no base recorded: the adapter config names none; pass --base")
        return None, None, None
    rec = base_row(query, wanted)
    if rec is not None:
        return _registered(rec, notes)
    found = find_base_dir(wanted)
    if found is None:
        _not_found(query, wanted, base, notes)
        return wanted, None, None
    info = read_base(found)
    for row in query("SELECT name, fingerprint FROM bases", ()):
        if row["fingerprint"] == info.fingerprint:
            return row["name"], info.fingerprint, info
    key = str(found) if Path(wanted).expanduser().exists() else wanted
    return key, info.fingerprint, info


def same_model(
    query: Query, declared: str, base: str, base_key: str | None, info: BaseInfo | None
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
    rec = base_row(query, declared)
    found = Path(rec["path"]) if rec is not None else find_base_dir(declared)
    if found is not None and info is not None and found.resolve() == Path(info.path).resolve():
        return True
    # trained on a local copy of a Hub model (or the reverse): the same last name
    tail = norm(declared).rpartition("/")[2]
    return bool(tail) and tail in {n.rpartition("/")[2] for n in names}
