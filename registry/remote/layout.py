"""Where a registry keeps its objects under ``s3://BUCKET/PREFIX/``, and what they hold.

::

    blobs/sha256/<digest>            adapter files, named by content (never rewritten)
    uploads/<digest>/<rand>          written by an add before it uploads a blob; protects
                                     the blob from gc for the grace period, then gc reaps it
    versions/NAME/N.json             a version's manifest (the record journal.py writes),
                                     created with If-None-Match: * once all its blobs are on
                                     the store: the create IS the allocation of number N.
                                     A remove replaces it (If-Match) by a tombstone
                                     ``{"name", "version", "removed": true}``: the key stays,
                                     so N is never given out again
    tags/NAME/TAG.json               {"version": N | null}: moved by If-Match compare-and-swap
                                     (null: the tag was removed); never deleted
    active/<BASE>.json               {"refs": [...]}: the active adapters of a base, CAS
    bases/NAME.json                  {"name", "fingerprint", "summary", "created"}: no path
    evals/NAME/N/<stamp>-<rand>.json evaluation records, append-only creates
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from urllib.parse import quote, unquote

BLOBS = "blobs/sha256/"
UPLOADS = "uploads/"
TRASH = "trash/sha256/"  # a blob gc is deleting, kept until gc has checked no add took it
VERSIONS = "versions/"
TAGS = "tags/"
ACTIVE = "active/"
BASES = "bases/"
EVALS = "evals/"


def blob(digest: str) -> str:
    return f"{BLOBS}{digest}"


def upload_marker(digest: str) -> str:
    import secrets

    return f"{UPLOADS}{digest}/{secrets.token_hex(6)}"


def trash(digest: str) -> str:
    return f"{TRASH}{digest}"


def manifest(name: str, version: int) -> str:
    return f"{VERSIONS}{name}/{version}.json"


def tag(name: str, tag_name: str) -> str:
    return f"{TAGS}{name}/{tag_name}.json"


def active(base: str) -> str:
    """A base key may be a path or a Hub id: quoted whole into one object name."""
    return f"{ACTIVE}{quote(base or '_', safe='')}.json"


def active_base(key: str) -> str:
    text = unquote(key[len(ACTIVE) : -len(".json")])
    return "" if text == "_" else text


def base(name: str) -> str:
    return f"{BASES}{name}.json"


def evals_prefix(name: str, version: int) -> str:
    return f"{EVALS}{name}/{version}/"


def parse_manifest_key(key: str) -> tuple[str, int] | None:
    """``versions/NAME/N.json`` -> (NAME, N); None for anything else."""
    parts = key.split("/")
    if len(parts) != 3 or not parts[2].endswith(".json"):
        return None
    stem = parts[2][: -len(".json")]
    return (parts[1], int(stem)) if stem.isdigit() else None


def parse_tag_key(key: str) -> tuple[str, str] | None:
    parts = key.split("/")
    if len(parts) != 3 or not parts[2].endswith(".json"):
        return None
    return parts[1], parts[2][: -len(".json")]


def dumps(doc: object) -> bytes:
    return json.dumps(doc, default=str, ensure_ascii=False, sort_keys=True).encode()


@dataclass
class TagDoc:
    version: int | None  # None: removed

    def encode(self) -> bytes:
        return dumps({"version": self.version})

    @classmethod
    def decode(cls, data: bytes) -> TagDoc:
        doc = json.loads(data)
        v = doc.get("version") if isinstance(doc, dict) else None
        return cls(v if isinstance(v, int) and not isinstance(v, bool) else None)


@dataclass
class ActiveDoc:
    refs: list[str]

    def encode(self) -> bytes:
        return dumps({"refs": self.refs})

    @classmethod
    def decode(cls, data: bytes) -> ActiveDoc:
        doc = json.loads(data)
        refs = doc.get("refs") if isinstance(doc, dict) else None
        return cls([str(r) for r in refs] if isinstance(refs, list) else [])


@dataclass
class BaseDoc:
    name: str
    fingerprint: str
    summary: dict
    created: float

    def encode(self) -> bytes:
        return dumps(
            {"name": self.name, "fingerprint": self.fingerprint, "summary": self.summary,
             "created": self.created}
        )  # fmt: skip

    @classmethod
    def decode(cls, data: bytes) -> BaseDoc:
        doc = json.loads(data)
        return cls(
            str(doc["name"]), str(doc["fingerprint"]), dict(doc.get("summary") or {}),
            float(doc.get("created") or 0),
        )  # fmt: skip


def is_tombstone(doc: object) -> bool:
    return isinstance(doc, dict) and doc.get("removed") is True
