"""Adding a version: the checks before the writer lock, the staged copy, the commit.

:meth:`Registry.add` runs these in order; what the add has to say goes to a ``notes`` list
that ends up on the returned record (:attr:`AdapterVersion.warnings`).
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import (
    IncompatibleBaseError,
    InterruptedAfterStore,
    InvalidAdapterError,
    InvalidInputError,
    PluginError,
)
from adaptr.registry import index
from adaptr.registry.adapter_dir import (
    CONFIG,
    WEIGHTS,
    AdapterSource,
    inspect_adapter,
    saved_tensors,
)
from adaptr.registry.bases import Query, attach_base, same_model
from adaptr.registry.blobs import BlobStore, SourceChanged, hash_file
from adaptr.registry.fingerprint import BaseInfo, check_adapter_fits
from adaptr.registry.journal import Journal, insert_version
from adaptr.registry.models import AdapterVersion
from adaptr.registry.patterns import check_patterns, module_names_of
from adaptr.registry.safetensors_header import write_renamed

Stored = list[tuple[str, str, int]]  # (file name, digest, size) of each stored file


@dataclass
class Planned:
    """An adapter folder checked against its base, before anything is copied."""

    adapter: AdapterSource
    base_key: str | None
    fingerprint: str | None
    lineage: dict


def plan(
    query: Query,
    source: str | Path,
    base: str | None,
    notes: list[str],
    *,
    lineage: dict | None,
    origin: str | None,
    allow_large: bool,
) -> Planned:
    """Inspect ``source`` and check it fits its base (refused before any copy)."""
    adapter = inspect_adapter(source, allow_large=allow_large)
    declared = adapter.config.get("base_model_name_or_path")
    base_key, fingerprint, base_info = attach_base(query, base, declared, notes)
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
    if base and declared and not same_model(query, declared, base, base_key, base_info):
        notes.append(_other_model_note(declared, base_key, base_info))
    if adapter.renames:
        notes.append(_renamed_note(adapter))
    lineage = {**(lineage or {}), "source": origin or str(adapter.root.resolve())}
    if base_key is not None:
        lineage.setdefault("base", base_key)
        lineage.setdefault("base_fingerprint", fingerprint)
    return Planned(adapter, base_key, fingerprint, lineage)


def _other_model_note(declared: str, base_key: str | None, info: BaseInfo | None) -> str:
    where = base_key
    if info is not None and str(info.path) != base_key:
        where = f"{base_key} ({info.path})"
    return (
        f"the adapter config says it was trained on {declared!r}, and it is added to base "
        f"{where}, another model"
        + (" with the same shapes" if info else "")
        + ": check that this is the base it was trained on"
    )


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


def check_one_base(
    conn: sqlite3.Connection, name: str, base: str | None, fingerprint: str | None
) -> None:
    """A name keeps one base, so ``NAME`` and ``NAME@tag`` never change base under a user."""
    for row in conn.execute(
        "SELECT DISTINCT base, base_fingerprint FROM versions WHERE name=?", (name,)
    ):
        same = fingerprint is not None and row["base_fingerprint"] == fingerprint
        if row["base"] != base and not same:
            raise IncompatibleBaseError(
                f"{name} holds versions on base {row['base'] or '(none recorded)'}, and this "
                f"adapter is on {base or '(none recorded)'}: a name keeps one base; add it "
                f"under another name (or pass --base {row['base']} if that is its base)"
            )


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


def _stage_one(blobs: BlobStore, adapter: AdapterSource, f: Path, dest: Path) -> tuple[str, int]:
    """Copy one source file to ``dest`` (weights under the names save_pretrained writes)."""
    try:
        digest, size = blobs.stage(f, dest)
    except SourceChanged:
        raise InvalidAdapterError(
            f"{adapter.root} changed while it was being added ({f.name} was "
            "rewritten during its copy); nothing was stored: add it again once "
            "nothing is writing to it"
        ) from None
    if f.name == WEIGHTS and adapter.renames:
        raw = dest.parent / f".{f.name}.source"
        os.replace(dest, raw)
        write_renamed(raw, dest, adapter.renames)
        raw.unlink()
        digest, size = hash_file(dest)
    return digest, size


def store_files(
    blobs: BlobStore, adapter: AdapterSource, allow_large: bool, notes: list[str]
) -> tuple[AdapterSource, Stored]:
    """Copy the adapter's files into the blob store (under the writer lock); returns the
    staged copy's inspection and (name, digest, size) of each file.

    Each copy is checked to be one whole state of its source, and the copies together to
    hold the tensors checked before (base fit included), or nothing is stored.
    """
    stage = blobs.tmp / f"add-{os.getpid()}-{secrets.token_hex(6)}"
    stage.mkdir(parents=True)
    try:
        stored = [(f.name, *_stage_one(blobs, adapter, f, stage / f.name)) for f in adapter.files]
        adapter = _recheck(adapter, stage, allow_large)
        for fname, digest, size in stored:
            if blobs.adopt(stage / fname, digest, size):
                notes.append(
                    f"the stored copy of {fname} ({digest[:12]}…) was corrupt; this "
                    "add replaced it with the intact content"
                )
    finally:  # empty once adopted; a failed add leaves its copies here
        for leftover in stage.iterdir():
            leftover.unlink()
        stage.rmdir()
    return adapter, stored


def same_content(conn: sqlite3.Connection, name: str, stored: Stored) -> tuple[str, bool] | None:
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


def same_content_note(ref: str, same: tuple[str, bool]) -> str:
    other_ref, identical = same
    what = "identical to" if identical else "the same weights and config as"
    other = "" if identical else " (other files differ)"
    return (
        f"{ref} is {what} {other_ref}{other}; stored anyway: `adaptr rm "
        f"{ref}` removes it if you did not mean to add it again"
    )


def commit(
    conn: sqlite3.Connection,
    journal: Journal,
    record: dict,
    tags: Sequence[str],
    publish: Callable[[dict], dict],
) -> int:
    """Number, publish and commit the version ``record`` (with its tags) in one transaction
    with its manifest; returns its version number."""
    name = record["name"]
    pending = None
    try:
        with index.transaction(conn):
            row = conn.execute("SELECT next_version FROM names WHERE name=?", (name,)).fetchone()
            # past any number the journal holds too (an index that lost its counter)
            record["version"] = max(row[0] if row else 1, journal.highest(name) + 1)
            record["created"] = time.time()
            record = publish(record)  # a store allocates its number here
            version = record["version"]
            pending = journal.begin_add(record)
            insert_version(conn, record)
            conn.executemany(
                "INSERT OR REPLACE INTO tags(name, tag, version) VALUES (?,?,?)",
                [(name, t, version) for t in tags],
            )
    except BaseException:
        if pending is not None:
            pending.unlink(missing_ok=True)
        raise
    journal.place(pending, name, version)
    return version


def version_record(
    name: str, planned: Planned, adapter: AdapterSource, stored: Stored, metrics: dict | None
) -> dict:
    """The manifest of a version about to be committed (its number and time set by
    :func:`commit`)."""
    summary = adapter.summary()
    return {
        "name": name, "version": 0, "created": 0.0, "base": planned.base_key,
        "base_fingerprint": planned.fingerprint, "peft_type": summary.get("peft_type"),
        "r": summary.get("r"), "size": sum(s for _, _, s in stored),
        "summary": summary, "config": adapter.config, "lineage": planned.lineage,
        "metrics": metrics or {}, "source": planned.lineage["source"],
        "files": [{"path": n, "sha256": d, "size": z} for n, d, z in stored],
    }  # fmt: skip


def announce(registry, version: AdapterVersion, notes: list[str]) -> None:
    """Tell plugins (``adaptr_version_added``); a failing plugin is noted, never undoes the add."""
    from adaptr.extend.manager import PLUGINS

    try:
        PLUGINS.fire("adaptr_version_added", registry=registry, version=version)
    except InterruptedAfterStore:
        raise  # names the plugin already
    except PluginError as e:  # names the plugin and what to do
        notes.append(f"{e}; {version.ref} is stored")
    except KeyboardInterrupt as e:  # still stops the caller, saying the version is stored
        raise InterruptedAfterStore(version.ref, "a plugin's adaptr_version_added") from e
    except BaseException as e:  # SystemExit too: a plugin never ends the add
        notes.append(
            f"a plugin's adaptr_version_added failed ({type(e).__name__}: {e}); {version.ref} is stored"
        )
