"""gc on the store: two phases with a grace period.

An add writes ``uploads/<digest>/<rand>`` before it uploads (or finds) each blob, and only
then creates its manifest. gc:

1. lists every manifest (tombstones reference nothing) and collects the digests they list;
2. lists the blobs; a blob is a candidate when no manifest lists it and the store's
   last-modified time is older than the grace period;
3. for each candidate, lists its upload markers just before deleting it: a marker younger
   than the grace period means an add may be about to reference it, and the blob stays;
4. deletes markers older than the grace period.

A candidate is copied to ``trash/`` before its delete, and its markers are listed once more
after it: an add that marked it in between (and so may have published a manifest that
lists it) gets it back from the trash. With that check, an add that found the blob still
there has its marker seen, and one that comes later finds the blob gone and uploads it
again, so no interleaving loses a referenced blob. A gc killed in between leaves the copy
in ``trash/``, which the next gc puts back (if listed or marked) or drops.

Markers are never deleted by the add that wrote them (an add finishing between gc's steps 1
and 3 would otherwise leave its new manifest unseen and its marker gone), so an add that
takes less than the grace period (default 1 h, ``$ADAPTR_REMOTE_GC_GRACE`` seconds) is safe.
An add that starts after step 3 re-checks its blobs after creating its manifest and
uploads again any that a gc deleted meanwhile.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

from adaptr.registry.journal import manifest_problem
from adaptr.registry.remote import checkpoint, layout
from adaptr.registry.remote.store import NotFound, ObjectStore
from adaptr.registry.remote.sync import _fetch

DEFAULT_GRACE = 3600.0


def default_grace() -> float:
    try:
        return float(os.environ.get("ADAPTR_REMOTE_GC_GRACE", DEFAULT_GRACE))
    except ValueError:
        return DEFAULT_GRACE


@dataclass
class StoreGcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    markers_removed: int = 0
    kept_young: int = 0  # unreferenced, but younger than the grace period or marked
    kept: list[str] = field(default_factory=list)


def _taken(store: ObjectStore, digest: str, grace: float, now: float) -> bool:
    """Whether an add marked ``digest`` within the grace period (it may reference it)."""
    return any(now - m.modified < grace for m in store.list(f"{layout.UPLOADS}{digest}/"))


def _settle_trash(store: ObjectStore, used: set[str], grace: float, now: float) -> None:
    """Blobs a killed gc left in the trash: put back what a manifest lists or an add marked,
    drop the rest."""
    for t in store.list(layout.TRASH):
        digest = t.key.rpartition("/")[2]
        if (digest in used or _taken(store, digest, grace, now)) and store.exists(
            layout.blob(digest)
        ) is None:
            store.copy(t.key, layout.blob(digest))
        store.delete(t.key)


def referenced(store: ObjectStore) -> set[str]:
    """Every digest any manifest on the store lists; refuses (IntegrityError) when one
    cannot be read, since its blobs may be the only copy."""
    from adaptr.errors import IntegrityError

    metas = [m for m in store.list(layout.VERSIONS) if layout.parse_manifest_key(m.key)]
    used: set[str] = set()
    for key, got in _fetch(store, metas).items():
        if got is None:
            continue
        try:
            doc = json.loads(got[0])
        except ValueError:
            doc = None
        if layout.is_tombstone(doc):
            continue
        name, version = layout.parse_manifest_key(key)  # type: ignore[misc]
        if manifest_problem(doc, name, str(version)) is not None:
            raise IntegrityError(
                f"gc refused: the manifest {store.location.url}/{key} cannot be read, and the "
                "files it lists may be the only copy; nothing was deleted"
            )
        used.update(f["sha256"] for f in doc["files"])
    return used


def store_gc(store: ObjectStore, grace: float | None = None) -> StoreGcReport:
    grace = default_grace() if grace is None else float(grace)
    report = StoreGcReport()
    used = referenced(store)
    now = time.time()
    _settle_trash(store, used, grace, now)
    for blob in store.list(layout.BLOBS):
        digest = blob.key.rpartition("/")[2]
        if digest in used:
            continue
        if now - blob.modified < grace:
            report.kept_young += 1
            continue
        markers = store.list(f"{layout.UPLOADS}{digest}/")
        if any(now - m.modified < grace for m in markers):
            report.kept_young += 1
            report.kept.append(digest)
            continue
        try:
            store.head(blob.key)
        except NotFound:
            continue
        store.copy(blob.key, layout.trash(digest))  # kept until the check after the delete
        store.delete(blob.key)
        checkpoint("gc-after-delete")
        if _taken(store, digest, grace, time.time()):  # an add took it meanwhile: put it back
            store.copy(layout.trash(digest), blob.key)
            report.kept_young += 1
            report.kept.append(digest)
        else:
            report.blobs_removed += 1
            report.bytes_freed += blob.size
        store.delete(layout.trash(digest))
    for m in store.list(layout.UPLOADS):
        if now - m.modified >= grace:
            store.delete(m.key)
            report.markers_removed += 1
    return report
