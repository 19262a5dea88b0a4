"""Records the registry returns: adapter versions, bases, and maintenance reports."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict, dataclass, field


@dataclass
class StoredFile:
    path: str
    sha256: str
    size: int


_NOT_STORED = ("files", "skipped", "warnings")  # files: listed below; the notes: never


@dataclass
class AdapterVersion:
    """One immutable version of a named adapter."""

    name: str
    version: int
    created: float
    base: str | None
    base_fingerprint: str | None
    peft_type: str | None
    r: int | None
    size: int
    summary: dict
    config: dict
    lineage: dict
    metrics: dict
    source: str | None
    files: list[StoredFile] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    active: bool = False
    # what the add that returned this record said (never stored; empty on every read)
    skipped: tuple[str, ...] = field(default=(), compare=False, repr=False)  # files left out
    warnings: tuple[str, ...] = field(default=(), compare=False, repr=False)  # the rest

    @property
    def notes(self) -> tuple[str, ...]:
        """Everything the add said, in order: the skipped files first, then the warnings."""
        return tuple(f"skipped {s}" for s in self.skipped) + self.warnings

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def lora_alpha(self):
        return self.summary.get("lora_alpha")

    @property
    def target_modules(self):
        return self.summary.get("target_modules")

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in _NOT_STORED}
        d["files"] = [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in self.files]
        d["ref"] = self.ref
        return d

    @classmethod
    def from_row(cls, row: sqlite3.Row, *, lineage: bool = True) -> AdapterVersion:
        """A version from its index row; ``lineage=False`` leaves the lineage (log history
        included, the bulk of a trained version's record) undecoded, as ``{}``."""
        return cls(
            name=row["name"], version=row["version"], created=row["created"], base=row["base"],
            base_fingerprint=row["base_fingerprint"], peft_type=row["peft_type"], r=row["r"],
            size=row["size"], summary=json.loads(row["summary"]), config=json.loads(row["config"]),
            lineage=json.loads(row["lineage"]) if lineage else {}, metrics=json.loads(row["metrics"]), source=row["source"],
        )  # fmt: skip


@dataclass
class BaseRecord:
    """A registered base model: a name for a local model folder and its fingerprint."""

    name: str
    path: str
    fingerprint: str
    summary: dict
    created: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class VerifyReport:
    versions: int = 0
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    unreferenced: int = 0  # blobs no version references (``gc`` frees them): not a problem
    unreferenced_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class GcReport:
    blobs_removed: int = 0
    bytes_freed: int = 0
    staged_removed_bytes: int = 0
    kept_unindexed: list[str] = field(default_factory=list)  # manifests the index lacks

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RebuildReport:
    """What :meth:`Registry.reindex` restored from the manifests."""

    versions: int = 0
    tags: int = 0
    bases: int = 0
    skipped: list[str] = field(default_factory=list)
    damaged: list[str] = field(default_factory=list)  # manifests that could not be read
    repaired: list[str] = field(default_factory=list)  # manifests rewritten from the old index
    state_problem: str | None = None  # why tags/active/bases came from elsewhere, or not at all
    moved_aside: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)
