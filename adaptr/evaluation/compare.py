"""Versions side by side: the compare table (training metrics and stored evals on one dataset,
best per column) and the training loss curves of stored log histories."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptr.errors import InvalidInputError
from adaptr.evaluation.metrics import LOWER_IS_BETTER, METRICS, TRAINING, TRAINING_COLUMNS
from adaptr.evaluation.records import (
    Condition,
    MeasureKey,
    Measurement,
    data_hash,
    eval_records,
    measurements,
)

if TYPE_CHECKING:
    from adaptr.registry import AdapterVersion, Registry


def compare(
    registry: Registry, refs: Sequence[str], data: str | Path | None = None
) -> dict[str, Any]:
    """Versions x metrics: training metrics and the stored evals on one dataset (``data``'s
    hash, else the dataset of the newest eval among ``refs``); ``best`` per column.

    Values of a metric measured with different settings (format, options, limit,
    max_new_tokens, BLEU tokenizer) are not comparable: each setting gets its own column,
    named by what differs (``bleu[tokenize=zh]``), and ``settings`` says each column's."""
    versions = [registry.get(r) for r in refs]
    if not versions:
        raise InvalidInputError("give at least one adapter reference")
    sha = data_hash(data)
    if sha is None:
        newest = max(
            (r for v in versions for r in eval_records(registry, v.ref) if r.dataset.sha256),
            key=lambda r: r.created,
            default=None,
        )
        sha = newest.dataset.sha256 if newest else None
    found = {v.ref: measurements(registry, v.ref, sha) if sha else {} for v in versions}
    labels, settings = _labels(found)
    rows, columns = [], []
    for v in versions:
        values = _row(v, found[v.ref], labels)
        rows.append({"ref": v.ref, "tags": v.tags, "metrics": values})
        columns += [c for c in values if c not in columns]
    order = {m: i for i, m in enumerate((*METRICS, *TRAINING_COLUMNS.values()))}
    columns.sort(key=lambda c: (order.get(c.split("[")[0], len(order)), c))
    dataset = next((m.dataset.to_dict() for ms in found.values() for m in ms.values()), None)
    others: dict[str, dict] = {}  # the other datasets these versions were evaluated on
    for v in versions:
        for r in eval_records(registry, v.ref):
            if r.dataset.sha256 and r.dataset.sha256 != sha:
                others.setdefault(r.dataset.sha256, r.dataset.to_dict())
    return {"dataset": dataset, "sha256": sha, "columns": columns, "rows": rows,
            "best": _best(rows, columns), "settings": settings,
            "other_datasets": list(others.values())}  # fmt: skip


def _labels(
    found: dict[str, dict[MeasureKey, Measurement]],
) -> tuple[dict[tuple[str, str], str], dict[str, dict]]:
    """Each (metric, settings key)'s column label and each label's settings: a metric measured
    with several settings gets a column per setting, named by what differs."""
    variants: dict[str, dict[str, Condition]] = {}  # metric -> settings key -> settings
    for ms in found.values():
        for key, m in ms.items():
            variants.setdefault(key.metric, {})[key.settings] = m.condition
    labels: dict[tuple[str, str], str] = {}
    settings: dict[str, dict] = {}
    for metric, conds in variants.items():
        shown = {key: cond.to_dict() for key, cond in conds.items()}
        first = next(iter(shown.values()))
        differ = [k for k in first if len({str(c.get(k)) for c in shown.values()}) > 1]
        for key, cond in shown.items():
            label = metric
            if len(shown) > 1:
                label += "[" + ",".join(f"{k}={_short(cond.get(k))}" for k in differ) + "]"
            labels[(metric, key)] = label
            settings[label] = cond
    return labels, settings


def _row(
    v: AdapterVersion, found: dict[MeasureKey, Measurement], labels: dict[tuple[str, str], str]
) -> dict[str, float]:
    values: dict[str, float] = {}
    for m in TRAINING:
        if isinstance(v.metrics.get(m), (int, float)):
            values[TRAINING_COLUMNS[m]] = v.metrics[m]
    for key, got in found.items():
        values[labels[(key.metric, key.settings)]] = got.value
    return values


def _best(rows: list[dict], columns: list[str]) -> dict[str, list[str]]:
    """Column -> the refs with its best value (ties: all); columns with one value have none."""
    best: dict[str, list[str]] = {}
    for c in columns:
        have = [(r["metrics"][c], r["ref"]) for r in rows if c in r["metrics"]]
        lower = c.split("[")[0] in LOWER_IS_BETTER
        if len(have) > 1:
            top = (min if lower else max)(value for value, _ in have)
            best[c] = [ref for value, ref in have if value == top]
    return best


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def curves(registry: Registry, refs: Sequence[str]) -> dict[str, dict[str, list]]:
    """Per version the series of its stored training log history:
    ``{ref: {"loss": [(step, value)…], "eval_loss": […], "learning_rate": […]}}``."""
    out = {}
    for ref in refs:
        v = registry.get(ref)
        history = v.lineage.get("log_history")
        if not history:
            raise InvalidInputError(
                f"{v.ref} has no stored training log (versions trained by adaptr before log "
                "histories were kept, or added with `adaptr add`, have none)"
            )
        series: dict[str, list] = {"loss": [], "eval_loss": [], "learning_rate": []}
        for entry in history:
            step = entry.get("step")
            for key in series:
                if isinstance(entry.get(key), (int, float)) and step is not None:
                    series[key].append((step, float(entry[key])))
        out[v.ref] = series
    return out
