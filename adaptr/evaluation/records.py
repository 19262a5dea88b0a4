"""Stored evaluation records, typed: what :func:`adaptr.evaluation.run.evaluate` stores on each
version (append-only, :meth:`Registry.add_evals`) and the measurements gates and compare read.

A record's JSON is the registry's storage format: :meth:`EvalRecord.to_dict` writes the keys
evaluation has always written, in the same order; :meth:`EvalRecord.from_dict` reads records
written by hand or by other tools too (missing parts are empty, unknown keys are kept).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from adaptr.evaluation.metrics import GENERATION
from adaptr.values import is_number

if TYPE_CHECKING:
    from adaptr.registry import Registry

_DATASET_KEYS = ("path", "sha256", "format", "kind", "records")
_RECORD_KEYS = (
    "metrics", "dataset", "settings", "signatures", "libraries", "family", "created", "base_line",
)  # fmt: skip



def data_file(data: str | Path) -> Path:
    """The data file ``data``, or a one-line error saying what it is instead (missing, a
    folder, a device such as /dev/urandom, a pipe…)."""
    from adaptr.registry.atomic import regular_file

    return regular_file(data, "data file")


def data_hash(data: str | Path | None) -> str | None:
    """The SHA-256 stored evals name ``data`` by (None for None)."""
    if data is None:
        return None
    from adaptr.registry.blobs import hash_file

    return hash_file(data_file(data))[0]


@dataclass
class DatasetInfo:
    """The data an eval ran on (a field is None when the record does not say it)."""

    path: str | None = None
    sha256: str | None = None
    format: str | None = None
    kind: str | None = None  # the records' kind: text, prompt-completion, messages…
    records: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys other tools wrote, kept

    @classmethod
    def from_dict(cls, d: Any) -> DatasetInfo:
        d = d if isinstance(d, dict) else {}
        extra = {k: v for k, v in d.items() if k not in _DATASET_KEYS}
        return cls(**{k: d.get(k) for k in _DATASET_KEYS}, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _DATASET_KEYS if getattr(self, k) is not None} | (
            self.extra
        )

    @property
    def name(self) -> str:
        """``dev.jsonl (sha256 0123456789ab)``: how messages name the data."""
        return f"{Path(self.path).name if self.path else 'data'} (sha256 {str(self.sha256)[:12]})"


@dataclass(frozen=True)
class Condition:
    """What has to be equal for two values of ``metric`` to be comparable, beside the data's
    SHA-256: the format and its options, the record limit (None: every record), the generation
    length for the generation metrics and the tokenizer for BLEU."""

    metric: str
    format: str | None
    options: dict[str, Any]
    limit: int | None
    max_new_tokens: int | None = None  # generation metrics only
    tokenize: str | None = None  # BLEU only

    def to_dict(self) -> dict[str, Any]:
        """The settings as compare and gates show them (the metric's own keys only)."""
        out: dict[str, Any] = {"format": self.format, "options": self.options,
                               "limit": self.limit}  # fmt: skip
        if self.metric in GENERATION:
            out["max_new_tokens"] = self.max_new_tokens
        if self.metric == "bleu":
            out["tokenize"] = self.tokenize
        return out

    def key(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, default=str)


class MeasureKey(NamedTuple):
    """Values under one key are comparable: same metric, data and settings."""

    metric: str
    sha256: str
    settings: str  # Condition.key()


@dataclass
class Measurement:
    """One stored value of one metric, with the data and settings it was measured on."""

    metric: str
    value: float
    dataset: DatasetInfo
    condition: Condition
    created: float

    @property
    def key(self) -> MeasureKey:
        return MeasureKey(self.metric, self.dataset.sha256 or "", self.condition.key())


@dataclass
class EvalRecord:
    """One stored evaluation of one version."""

    metrics: dict[str, Any]
    dataset: DatasetInfo
    settings: dict[str, Any] = field(default_factory=dict)  # what the run was given
    signatures: dict[str, str] = field(default_factory=dict)  # sacrebleu's, per metric
    libraries: dict[str, Any] = field(default_factory=dict)
    family: str | None = None
    created: float = 0
    base_line: dict[str, float] | None = None  # the bare base's scores, when measured
    ref: str | None = None  # NAME@N, set by the registry when stored
    extra: dict[str, Any] = field(default_factory=dict)  # keys other tools wrote, kept

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalRecord:
        known = (*_RECORD_KEYS, "ref")
        return cls(
            metrics=d.get("metrics") or {}, dataset=DatasetInfo.from_dict(d.get("dataset")),
            settings=d.get("settings") or {}, signatures=d.get("signatures") or {},
            libraries=d.get("libraries") or {}, family=d.get("family"),
            created=d.get("created", 0), base_line=d.get("base_line"), ref=d.get("ref"),
            extra={k: v for k, v in d.items() if k not in known},
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        """The stored JSON: the keys in the order evaluation writes them (``ref`` last, when set)."""
        out = {k: getattr(self, k) for k in _RECORD_KEYS}
        out["dataset"] = self.dataset.to_dict()
        if self.ref is not None:
            out["ref"] = self.ref
        return out | self.extra

    def bleu_tokenizer(self) -> str:
        """The BLEU tokenizer: the settings', else the signature's (``tok:``), else 13a."""
        tok = self.settings.get("bleu_tokenize")
        if tok:
            return str(tok)
        m = re.search(r"(?:^|\|)tok:([^|]+)", self.signatures.get("bleu") or "")
        return m.group(1) if m else "13a"

    def condition(self, metric: str) -> Condition:
        """The settings a value of ``metric`` in this record is comparable under."""
        limit = self.settings.get("limit")
        records = self.dataset.records
        if isinstance(limit, int) and isinstance(records, int) and limit > records:
            limit = None  # a limit above the records there were: the whole data
        return Condition(
            metric, self.dataset.format, self.settings.get("options") or {}, limit,
            self.settings.get("max_new_tokens") if metric in GENERATION else None,
            self.bleu_tokenizer() if metric == "bleu" else None,
        )  # fmt: skip

    def measured(self) -> Iterator[Measurement]:
        """Each metric value that is a number (others are not measurements)."""
        for metric, value in self.metrics.items():
            if is_number(value, finite=False):  # a diverged loss, inf ppl: measurements
                yield Measurement(metric, value, self.dataset, self.condition(metric), self.created)


def bleu_tokenizer_of(rec: dict[str, Any]) -> str:
    """The BLEU tokenizer of a stored record (as :meth:`Registry.evals` gives it)."""
    return EvalRecord.from_dict(rec).bleu_tokenizer()


def eval_records(registry: Registry, ref: str) -> list[EvalRecord]:
    """The stored evaluation records of a version, oldest first."""
    return [EvalRecord.from_dict(d) for d in registry.evals(ref)]


def measurements(
    registry: Registry, ref: str, sha256: str | None = None
) -> dict[MeasureKey, Measurement]:
    """The newest stored value of each metric per dataset and comparable settings (on dataset
    ``sha256`` only, if given). Values under one key are comparable."""
    out: dict[MeasureKey, Measurement] = {}
    for rec in eval_records(registry, ref):
        sha = rec.dataset.sha256
        if not sha or (sha256 and sha != sha256):
            continue
        for m in rec.measured():
            if m.key not in out or m.created >= out[m.key].created:
                out[m.key] = m
    return out


def data_names(found: Iterable[Measurement]) -> str:
    """The datasets of ``found``, once each: ``dev.jsonl (sha256 …), test.jsonl (sha256 …)``."""
    seen: dict[str | None, str] = {}
    for m in found:
        seen.setdefault(m.dataset.sha256, m.dataset.name)
    return ", ".join(seen.values())
