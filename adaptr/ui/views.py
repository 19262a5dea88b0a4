"""Typed view models of the UI's pages, built from the registry (no HTML here).

Each ``*_view`` function takes the registry and the request's parameters, already parsed,
and returns a dataclass the page's template renders. They call the same library functions
as the CLI (``Registry.list/get/evals``, ``evaluation.compare``, ``evaluation.curves``), so
a page and its command show the same things and refuse the same input in the same words.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError
from adaptr.values import ago, human_size

if TYPE_CHECKING:
    from adaptr.registry import AdapterVersion, Registry

PER_PAGE = 50
MAX_REFS = 8  # versions one curves / compare / playground page takes
MAX_CARD = 64 * 1024  # characters of a model card shown


def kind(v: AdapterVersion) -> str:
    s = v.summary
    flags = [f for f, on in (("dora", s.get("use_dora")), ("rslora", s.get("use_rslora"))) if on]
    return (v.peft_type or "?").lower() + (f"+{'+'.join(flags)}" if flags else "")


# ---------------------------------------------------------------- the adapters list
@dataclass
class Row:
    ref: str
    name: str
    version: int
    base: str
    kind: str
    rank: str
    size: str
    tags: list[str]
    active: bool
    created: str


@dataclass
class ListView:
    rows: list[Row]
    total: int  # versions matching the filters
    stored: int  # versions in the registry
    page: int
    pages: int
    bases: list[str]
    tags: list[str]
    base: str = ""
    tag: str = ""
    q: str = ""
    empty_reason: str | None = None  # no versions at all: what to do

    def page_url(self, page: int) -> str:
        from urllib.parse import urlencode

        query = {k: v for k, v in (("base", self.base), ("tag", self.tag), ("q", self.q)) if v}
        return "/adapters?" + urlencode({**query, "page": page})


def list_view(registry: Registry, versions: list, base: str = "", tag: str = "", q: str = "", page: int = 1) -> ListView:  # fmt: skip
    """Every version (``versions``: ``registry.list()``), newest first, filtered by base,
    tag and a part of the name, paged."""
    view = ListView([], 0, len(versions), 1, 1, [], [], base, tag, q)
    if not versions:
        home = registry.home.resolve()
        view.empty_reason = (
            f"no adapters yet in {home}: add one with `adaptr add NAME DIR` or `adaptr train`"
            if home.exists()
            else f"no registry at {home} (nothing was created there): pass --home (or set "
            "ADAPTR_HOME) to the registry you mean"
        )
        return view
    view.bases = sorted({v.base or "" for v in versions} - {""})
    view.tags = sorted({t for v in versions for t in v.tags})
    q = q.strip().lower()
    chosen = [
        v
        for v in versions
        if (not base or (v.base or "") == base)
        and (not tag or tag in v.tags)
        and (not q or q in v.name)
    ]
    chosen.sort(key=lambda v: (-v.created, v.name, -v.version))
    view.total = len(chosen)
    view.pages = max(1, -(-len(chosen) // PER_PAGE))
    view.page = min(max(1, page), view.pages)
    start = (view.page - 1) * PER_PAGE
    view.rows = [
        Row(v.ref, v.name, v.version, v.base or "-", kind(v), str(v.r or "-"),
            human_size(v.size), list(v.tags), v.active, ago(v.created))
        for v in chosen[start : start + PER_PAGE]
    ]  # fmt: skip
    return view


# ---------------------------------------------------------------- one version
@dataclass
class Field:
    key: str
    value: str


@dataclass
class EvalRow:
    created: str
    dataset: str
    sha256: str
    metrics: list[Field]
    settings: list[Field]


@dataclass
class VersionView:
    ref: str
    name: str
    active: bool
    tags: list[str]
    card: list[Field]  # the rows of `adaptr show`
    lineage: list[Field]
    metrics: list[Field]
    files: list[tuple[str, str, str]]  # path, size, sha256
    evals: list[EvalRow]
    datasets: list[tuple[str, str]]  # (sha256, name) of the evals, for the tag gate
    siblings: list[str]  # the other versions of the name
    graph: Any  # lineage.Graph
    model_card: str | None
    log_entries: int
    base: str | None
    active_refs: list[str] = field(default_factory=list)  # of its base


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, sort_keys=True)


def version_view(registry: Registry, ref: str) -> VersionView:
    """The `show` card of one version, its evals, tags, active state and lineage graph."""
    from adaptr.ui.lineage import graph

    v = registry.get(ref)
    s = v.summary
    card = [
        ("ref", v.ref), ("created", ago(v.created)), ("base", v.base or "-"),
        ("base fingerprint", v.base_fingerprint or "-"), ("type", kind(v)),
        ("r / alpha / dropout", f"{s.get('r')} / {s.get('lora_alpha')} / {s.get('lora_dropout')}"),
        ("target modules", _text(sorted(t) if isinstance(t := s.get("target_modules"), list) else t)),
        ("LoRA modules", str(s.get("lora_modules"))),
        ("parameters", f"{s.get('parameters', 0):,} ({', '.join(s.get('dtypes', []))})"),
        ("size", human_size(v.size)), ("source", v.source or "-"),
    ]  # fmt: skip
    card += [
        (k, _text(s[k])) for k in ("rank_pattern", "alpha_pattern", "modules_to_save") if s.get(k)
    ]
    extra = {k: x for k, x in v.lineage.items() if k not in ("source", "base", "base_fingerprint")}
    history = extra.pop("log_history", None)
    dataset = extra.get("dataset")
    if isinstance(dataset, dict) and dataset.get("sha256"):
        card.append(("dataset sha256", str(dataset["sha256"])))
    records = registry.evals(v.ref)
    evals, datasets = [], {}
    for e in records:
        ds = e.get("dataset") or {}
        name = _dataset_name(ds)
        if ds.get("sha256"):
            datasets.setdefault(ds["sha256"], name)
        evals.append(EvalRow(
            ago(e.get("created", 0)), name, str(ds.get("sha256", "-")),
            [Field(k, _metric(x)) for k, x in (e.get("metrics") or {}).items()],
            [Field(k, _text(x)) for k, x in (e.get("settings") or {}).items()],
        ))  # fmt: skip
    siblings = [o.ref for o in registry.list(v.name) if o.ref != v.ref]
    return VersionView(
        ref=v.ref, name=v.name, active=v.active, tags=list(v.tags),
        card=[Field(k, x) for k, x in card],
        lineage=[Field(k, _text(x)) for k, x in extra.items()],
        metrics=[Field(k, _metric(x)) for k, x in v.metrics.items()],
        files=[(f.path, human_size(f.size), f.sha256) for f in v.files],
        evals=evals, datasets=sorted(datasets.items(), key=lambda kv: kv[1]),
        siblings=siblings, graph=graph(registry, v), model_card=_model_card(registry, v),
        log_entries=len(history) if isinstance(history, list) else 0, base=v.base,
        active_refs=registry.active().get(v.base or "", []),
    )  # fmt: skip


def _dataset_name(ds: dict) -> str:
    from pathlib import PurePath

    path = ds.get("path")
    return PurePath(str(path)).name if path else "data"


def _metric(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else _text(value)  # fmt: skip


def _model_card(registry: Registry, v: AdapterVersion) -> str | None:
    """The version's stored README.md (read from the registry's store, hash-checked), as text."""
    if not any(f.path == "README.md" for f in v.files):
        return None
    try:
        data = registry.read_checked(v, "README.md")
    except AdaptrError as e:
        return f"(the model card cannot be read: {e})"
    text = data.decode("utf-8", errors="replace")
    return text if len(text) <= MAX_CARD else text[:MAX_CARD] + "\n… (cut)"


# ---------------------------------------------------------------- curves
@dataclass
class CurvesView:
    refs: list[str]
    series: dict[str, dict[str, list]]  # ref -> {"loss": [(step, value)], "eval_loss": …}
    notes: list[str]
    choices: list[str]  # versions with a stored training log

    def chart(self) -> dict:
        """uPlot's data: the union of steps as x, one y column per (ref, metric), nulls between."""
        steps = sorted({s for per in self.series.values() for pts in per.values() for s, _ in pts})
        index = {s: i for i, s in enumerate(steps)}
        labels, columns = [], []
        for ref, per in self.series.items():
            for metric in ("loss", "eval_loss"):
                if per.get(metric):
                    col: list[float | None] = [None] * len(steps)
                    for s, y in per[metric]:
                        col[index[s]] = y
                    labels.append(f"{ref} {metric}")
                    columns.append(col)
        return {"labels": labels, "data": [steps, *columns]}


def parse_refs(refs: list[str]) -> list[str]:
    """The refs a page was given (``ref=a&ref=b`` or ``ref=a,b``), de-duplicated, at most MAX_REFS."""
    out: list[str] = []
    for item in refs:
        out += [r.strip() for r in item.split(",") if r.strip() and r.strip() not in out]
    if len(out) > MAX_REFS:
        raise InvalidInputError(f"at most {MAX_REFS} versions at once (got {len(out)})")
    return out


def curves_view(registry: Registry, versions: list, refs: list[str]) -> CurvesView:
    from adaptr.evaluation.compare import curves

    refs = parse_refs(refs)
    for r in refs:
        registry.get(r)  # an unknown ref: the 404 page
    series, notes = {}, []
    for r in refs:
        try:
            series.update(curves(registry, [r]))
        except InvalidInputError as e:
            notes.append(str(e))
    choices = [v.ref for v in versions if v.lineage.get("log_history")]
    return CurvesView(refs, series, notes, choices)


# ---------------------------------------------------------------- compare
@dataclass
class CompareView:
    refs: list[str]
    table: dict | None  # evaluation.compare's document
    datasets: list[tuple[str, str]]  # every dataset the refs were evaluated on: (sha256, name)
    sha256: str  # the chosen one ("": the newest)
    choices: list[str]


class _EvalsOn:
    """The registry seen through the evals on one dataset only (by SHA-256), so the library's
    ``compare`` and ``promote`` pick a stored dataset without reading any file: the UI reads
    nothing outside the registry. Everything else goes to the registry itself."""

    def __init__(self, registry: Registry, sha256: str):
        self._registry, self._sha = registry, sha256

    def evals(self, ref):
        return [e for e in self._registry.evals(ref) if (e.get("dataset") or {}).get("sha256") == self._sha]  # fmt: skip

    def __getattr__(self, name: str):
        return getattr(self._registry, name)


def on_dataset(registry: Registry, sha256: str, refs: list[str]):
    """``registry`` limited to the evals on ``sha256`` ("" : the registry as it is); a
    dataset none of ``refs`` was evaluated on is a 404."""
    if not sha256:
        return registry
    if not any((e.get("dataset") or {}).get("sha256") == sha256 for r in refs for e in registry.evals(r)):  # fmt: skip
        raise NotFoundError(
            f"no stored eval of {', '.join(refs)} is on dataset sha256 {sha256[:64]!r}"
        )
    return _EvalsOn(registry, sha256)


def compare_view(registry: Registry, versions: list, refs: list[str], sha256: str = "") -> CompareView:  # fmt: skip
    from adaptr.evaluation.compare import compare

    refs = parse_refs(refs)
    choices = [v.ref for v in versions]
    if not refs:
        return CompareView([], None, [], sha256, choices)
    datasets: dict[str, str] = {}
    for r in refs:
        for e in registry.evals(r):
            ds = e.get("dataset") or {}
            if ds.get("sha256"):
                datasets.setdefault(ds["sha256"], _dataset_name(ds))
    table = compare(on_dataset(registry, sha256, refs), refs)
    return CompareView(refs, table, sorted(datasets.items(), key=lambda kv: kv[1]), sha256, choices)


# ---------------------------------------------------------------- playground
@dataclass
class PlaygroundView:
    refs: list[str]
    choices: dict[str, list[str]]  # base -> its versions
    loaded: list[str]


def playground_view(registry: Registry, versions: list, refs: list[str], loaded: list[str]) -> PlaygroundView:  # fmt: skip
    refs = parse_refs(refs)
    choices: dict[str, list[str]] = {b.name: [] for b in registry.bases()}
    for v in versions:
        if v.base in choices:
            choices[v.base].append(v.ref)
    return PlaygroundView(refs, choices, loaded)
