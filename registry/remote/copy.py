"""Copying versions between two registry homes (local or on a store), with their lineage,
tags, evaluation records and base records.

Each version keeps its number where the destination has not given that number out; a
version already there (the same files and creation time) is skipped, so a copy can be run
again after an interruption and only finishes what is missing: every version lands by the
destination's own atomic add (a manifest create on a store, a transaction locally).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from adaptr.errors import IntegrityError, NotFoundError
from adaptr.registry.journal import insert_version
from adaptr.registry.models import AdapterVersion
from adaptr.registry.refs import Ref
from adaptr.registry.registry import Registry
from adaptr.registry.remote import layout
from adaptr.registry.remote.store import PreconditionFailed

_RECORD_FIELDS = (
    "name", "version", "created", "base", "base_fingerprint", "peft_type", "r", "size",
    "summary", "config", "lineage", "metrics", "source",
)  # fmt: skip


@dataclass
class CopyReport:
    copied: list[str] = field(default_factory=list)  # SRC ref -> DST ref, "foo@3" or "foo@3->foo@5"
    skipped: list[str] = field(default_factory=list)  # already in the destination
    tags: list[str] = field(default_factory=list)
    evals: int = 0
    bases: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def _record(v: AdapterVersion) -> dict:
    rec = {k: getattr(v, k) for k in _RECORD_FIELDS}
    rec["files"] = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in v.files]
    return rec


def _same(a: dict, b: AdapterVersion | dict) -> bool:
    files_b = b["files"] if isinstance(b, dict) else [vars(f) for f in b.files]
    created_b = b["created"] if isinstance(b, dict) else b.created
    key = sorted((f["path"], f["sha256"]) for f in a["files"])
    return key == sorted((f["path"], f["sha256"]) for f in files_b) and a["created"] == created_b


def select(src: Registry, refs: tuple[str, ...]) -> list[AdapterVersion]:
    """The versions ``refs`` name (NAME: all its versions), every version when none."""
    if not refs:
        return src.list()
    out: dict[str, AdapterVersion] = {}
    for text in refs:
        r = Ref.parse(text)
        for v in src.list(r.name) if r.version is None and r.tag is None else [src.get(r)]:
            out[v.ref] = v
    return sorted(out.values(), key=lambda v: (v.name, v.version))


def copy(src: Registry, dst: Registry, refs: tuple[str, ...] = ()) -> CopyReport:
    report = CopyReport()
    versions = select(src, refs)
    mapped: dict[str, str] = {}
    for v in versions:
        for f in v.files:  # fetched and verified (a store's blobs) before anything is written
            if not src.blobs.intact(f.sha256):
                raise IntegrityError(
                    f"{v.ref}/{f.path} is missing or corrupt in the source; nothing more was "
                    "copied: run `adaptr verify` on it"
                )
        _copy_base(src, dst, v, report)
        number, fresh = _place(src, dst, _record(v))
        mapped[v.ref] = f"{v.name}@{number}"
        what = v.ref if number == v.version else f"{v.ref}->{v.name}@{number}"
        (report.copied if fresh else report.skipped).append(what)
        report.evals += _copy_evals(src, dst, v, mapped[v.ref])
    for v in versions:
        for t in v.tags:
            target = mapped[v.ref]
            try:
                if dst.get(f"{v.name}@{t}").ref == target:
                    continue
            except NotFoundError:
                pass
            dst.tag(target, t)
            report.tags.append(f"{v.name}@{t} -> {target}")
    return report


def _place(src: Registry, dst: Registry, rec: dict) -> tuple[int, bool]:
    """Put one version into ``dst``: (its number there, whether it was copied now)."""
    from adaptr.registry.remote.remote import RemoteRegistry

    name = rec["name"]
    if isinstance(dst, RemoteRegistry):
        dst.sync(force=True)
    try:
        for have in dst.list(name):
            if _same(rec, have):
                return have.version, False
    except NotFoundError:
        pass
    if isinstance(dst, RemoteRegistry):
        return _place_remote(src, dst, rec), True
    return _place_local(src, dst, rec), True


def _place_remote(src: Registry, dst, rec: dict) -> int:
    for f in sorted({f["sha256"] for f in rec["files"]}):
        dst.store.put(layout.upload_marker(f), b"")
        if dst.store.exists(layout.blob(f)) is None:
            dst.store.upload(layout.blob(f), src.blobs.path(f))
    version = rec["version"]
    while True:
        try:
            dst.store.create(
                layout.manifest(rec["name"], version), layout.dumps({**rec, "version": version})
            )
            break
        except PreconditionFailed:
            version += 1  # the number is taken there (another version, or removed)
    dst.sync(force=True)
    return version


def _place_local(src: Registry, dst: Registry, rec: dict) -> int:
    with dst.writer(creates=True) as conn:
        for f in rec["files"]:  # blobs first (under the lock, so no gc takes them), then one commit
            digest, _ = dst.blobs.put(src.blobs.path(f["sha256"]))
            if digest != f["sha256"]:
                raise IntegrityError(
                    f"{rec['name']}@{rec['version']}/{f['path']} changed while copied"
                )
        conn.execute("BEGIN IMMEDIATE")
        version = rec["version"]
        row = conn.execute("SELECT next_version FROM names WHERE name=?", (rec["name"],)).fetchone()
        taken = {
            r[0] for r in conn.execute("SELECT version FROM versions WHERE name=?", (rec["name"],))
        }
        highest = dst.journal.highest(rec["name"])
        if (
            version in taken
            or version <= highest
            and dst.journal.tombstone(rec["name"], version).exists()
        ):
            version = max(row[0] if row else 1, highest + 1)
        doc = {**rec, "version": version}
        pending = None
        try:
            pending = dst.journal.begin_add(doc)
            insert_version(conn, doc)
        except BaseException:
            conn.execute("ROLLBACK")
            if pending is not None:
                pending.unlink(missing_ok=True)
            raise
        conn.execute("COMMIT")
        dst.journal.place(pending, rec["name"], version)
    return version


def _copy_evals(src: Registry, dst: Registry, v: AdapterVersion, target: str) -> int:
    def key(rec: dict) -> str:
        return json.dumps({k: x for k, x in rec.items() if k != "ref"}, sort_keys=True, default=str)

    have = {key(r) for r in dst.evals(target)}
    missing = [r for r in src.evals(v.ref) if key(r) not in have]
    if missing:
        dst.add_evals([(target, r) for r in missing])
    return len(missing)


def _copy_base(src: Registry, dst: Registry, v: AdapterVersion, report: CopyReport) -> None:
    from adaptr.registry.remote.remote import RemoteRegistry

    if not v.base or v.base in report.bases:
        return
    rec = next((b for b in src.bases() if b.name == v.base), None)  # bound here or not
    if rec is None:
        return  # a path or Hub id, not a registered base: nothing to copy
    if isinstance(dst, RemoteRegistry):
        doc = layout.BaseDoc(rec.name, rec.fingerprint, rec.summary, rec.created or time.time())
        try:
            dst.store.create(layout.base(rec.name), doc.encode())
            report.bases.append(rec.name)
        except PreconditionFailed:
            pass  # there already (its fingerprint is checked where it is bound)
        return
    try:
        dst.get_base(rec.name)
    except NotFoundError:
        if rec.path:
            dst.add_base(rec.name, rec.path)
            report.bases.append(rec.name)
        else:
            report.notes.append(
                f"base {rec.name} is not bound on this machine: bind it in the destination with "
                f"`adaptr base add {rec.name} PATH`"
            )
