"""Gates on moving a tag: requirements on a version's stored evals (``chrf>=40``) and "no
worse than" another version, checked before :func:`promote` moves the tag."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adaptr.errors import InvalidInputError, NotFoundError
from adaptr.evaluation.metrics import GENERATION, LOWER_IS_BETTER, METRICS, metric_name
from adaptr.evaluation.records import (
    Condition,
    MeasureKey,
    Measurement,
    data_hash,
    data_names,
    measurements,
)

if TYPE_CHECKING:
    from adaptr.registry import AdapterVersion, Registry

_GATE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_-]*)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def parse_requirement(cond: str) -> tuple[str, str, float]:
    """``"chrf>=40"`` -> ``("chrf", ">=", 40.0)``; a one-line error if it cannot be read."""
    m = _GATE.match(cond) if isinstance(cond, str) else None
    if not m:
        raise InvalidInputError(
            f"cannot read the requirement {cond!r}: write METRIC OP VALUE with OP one of "
            ">=, <=, >, <, == (e.g. 'chrf>=40', 'loss<=1.5')"
        )
    metric = metric_name(m.group(1))
    if metric is None:
        raise InvalidInputError(
            f"unknown metric {m.group(1)!r} in the requirement {cond.strip()!r}: choose from "
            f"{', '.join(METRICS)}"
        )
    try:
        bound = float(m.group(3))
    except ValueError:
        bound = math.nan
    if not math.isfinite(bound):
        raise InvalidInputError(
            f"cannot read the requirement {cond.strip()!r}: {m.group(3)!r} is not a finite number"
        )
    return metric, m.group(2), bound


def _rival(registry: Registry, v: AdapterVersion, better_than: str, tag: str | None):
    """The version ``better_than`` names, or None for a first promotion: it names the tag
    being moved (``prod`` or ``NAME@prod``) and that tag does not exist yet. A bare word that
    is a tag of ``v``'s adapter (or the tag being moved) means that tag."""
    from adaptr.registry import Ref

    text = better_than.strip()
    if "@" not in text:
        try:
            return registry.get(f"{v.name}@{text}")
        except NotFoundError:
            if text == tag:
                return None
            try:
                return registry.get(text)
            except NotFoundError:
                raise NotFoundError(
                    f"--require-better-than {text!r}: {v.name} has no tag {text!r} and no "
                    "adapter has that name"
                ) from None
        except InvalidInputError:
            pass  # not a valid tag: read as a reference below
    parsed = Ref.parse(text)
    try:
        return registry.get(parsed)
    except NotFoundError:
        if parsed.name == v.name and parsed.tag is not None and parsed.tag == tag:
            return None
        raise


def check_gate(
    registry: Registry,
    ref: str,
    requires: Sequence[str] = (),
    better_than: str | None = None,
    *,
    data: str | Path | None = None,
    tag: str | None = None,
) -> list[str]:
    """Refuse (one-line :class:`~adaptr.errors.InvalidInputError` naming the metric(s))
    unless ``ref``'s stored evals meet every ``requires`` condition (``"chrf>=40"``,
    ``"loss<=1.5"``) and are no worse than ``better_than``'s on every metric both measured on
    the same data with the same settings. Returns what was checked, one line each.

    ``data``: only the evals on this file (by SHA-256); without it a requirement refuses when
    the metric was measured on several datasets. ``tag``: the tag about to move; when
    ``better_than`` names it (``prod``, ``NAME@prod``) and it does not exist yet, this is
    a first promotion: nothing to compare against, allowed with a line saying so."""
    requires = [requires] if isinstance(requires, str) else list(requires)
    parsed = [(cond.strip(), *parse_requirement(cond)) for cond in requires]
    if better_than is not None and not str(better_than).strip():
        raise InvalidInputError(
            "--require-better-than is empty: name the version to beat (a tag of REF's "
            "adapter such as prod, or NAME@TAG, NAME@N); the tag was not moved"
        )
    v = registry.get(ref)
    sha = data_hash(data)
    rival = _rival(registry, v, better_than, tag) if better_than else None
    if rival is not None and rival.ref == v.ref:
        raise InvalidInputError(
            f"--require-better-than {better_than} is {v.ref} itself: name the version it must "
            "beat; the tag was not moved"
        )
    where = f" on {Path(data).name}" if data is not None else ""
    checked, failed = [], []
    for text, metric, op, bound in parsed:
        m = _measured_for(registry, v.ref, text, metric, sha, data, where)
        tok = _settings_said(m.condition)
        line = f"{metric} {m.value:.4g} {op} {bound:g} on {m.dataset.name}{tok}"
        if _OPS[op](m.value, bound):
            checked.append(line)
        else:
            failed.append(f"{text} ({metric} is {m.value:.4g}{tok})")
    if failed:
        raise InvalidInputError(
            f"{v.ref} fails the requirement{'s' if len(failed) > 1 else ''} "
            f"{'; '.join(failed)}; the tag was not moved"
        )
    if better_than and rival is None:
        checked.append(
            f"{v.name}@{tag} does not exist yet: nothing to compare against, so this first "
            f"promotion is allowed (--require-better-than {better_than} applies from now on)"
        )
    elif rival is not None:
        checked += _better(registry, v.ref, rival.ref, better_than, sha, where)
    return checked


def _measured_for(
    registry: Registry, ref: str, text: str, metric: str, sha: str | None, data, where: str
) -> Measurement:
    """The value of ``metric`` requirement ``text`` is checked against: the newest on the
    whole data (else the newest), on one dataset; a one-line refusal when there is none."""
    found = [m for m in measurements(registry, ref, sha).values() if m.metric == metric]
    if not found:
        other = [m for m in measurements(registry, ref).values() if m.metric == metric]
        if other and sha:
            raise InvalidInputError(
                f"{ref} has no {metric} measured{where} to check {text!r} against (it has "
                f"{metric} on {data_names(other)}): run `adaptr eval {ref} --data "
                f"{data} --format FMT --metrics {metric}` first; the tag was not moved"
            )
        raise InvalidInputError(
            f"{ref} has no stored {metric} to check {text!r} against: run `adaptr eval "
            f"{ref} --data FILE --format FMT --metrics {metric}` first; the tag was not moved"
        )
    if len({m.dataset.sha256 for m in found}) > 1:
        raise InvalidInputError(
            f"{ref} has {metric} measured on several datasets ({data_names(found)}): "
            f"name the one {text!r} is about with --data FILE; the tag was not moved"
        )
    whole = [m for m in found if m.condition.limit is None]
    return max(whole or found, key=lambda m: m.created)  # the whole data's, if any


def _settings_said(cond: Condition) -> str:
    """What a gate line says of the settings a value was measured with."""
    said = []
    if cond.limit is not None:
        said.append(f"first {cond.limit} records only")
    if cond.metric in GENERATION and cond.max_new_tokens is not None:
        said.append(f"max_new_tokens {cond.max_new_tokens}")
    if cond.metric == "bleu":
        said.append(f"tokenize {cond.tokenize}")
    return "".join(f", {x}" for x in said)


def _order(key: MeasureKey) -> tuple:
    return METRICS.index(key.metric), key.sha256, key.settings


def _better(
    registry: Registry, mine_ref: str, other_ref: str, label: str, sha: str | None, where: str
) -> list[str]:
    mine = measurements(registry, mine_ref, sha)
    theirs = measurements(registry, other_ref, sha)
    name = f"{label} ({other_ref})" if label != other_ref else label
    known = {k for k in set(mine) & set(theirs) if k.metric in METRICS}  # (a direction)
    shared = sorted(known, key=_order)
    if not shared:
        same_data = {k[:2] for k in mine} & {k[:2] for k in theirs}
        why = (
            "measured with different settings (format, options, limit, max_new_tokens or BLEU "
            "tokenizer)"
            if same_data
            else f"{mine_ref} on {data_names(mine.values()) or 'nothing'}, {other_ref} on "
            f"{data_names(theirs.values()) or 'nothing'}"
        )
        raise InvalidInputError(
            f"{mine_ref} and {name} have no metric measured on the same data{where} with the "
            f"same settings ({why}): run `adaptr eval {mine_ref} {other_ref} --data FILE "
            "--format FMT` first; the tag was not moved"
        )
    checked = []
    worse: dict[str, list[str]] = {}  # dataset -> the metrics worse on it
    for key in shared:
        a, b = mine[key].value, theirs[key].value
        on = mine[key].dataset.name
        bad = a > b if key.metric in LOWER_IS_BETTER else a < b
        if bad or (math.isnan(a) and not math.isnan(b)):
            worse.setdefault(on, []).append(f"{key.metric} {a:.4g} vs {b:.4g}")
        else:
            checked.append(f"{key.metric} {a:.4g} vs {other_ref} {b:.4g} on {on}")
    if worse:
        said = "; ".join(f"{', '.join(ms)} on {on}" for on, ms in worse.items())
        raise InvalidInputError(f"{mine_ref} is worse than {name} on {said}; the tag was not moved")
    for key in sorted(set(theirs) - known, key=lambda k: str(tuple(k))):  # said, not skipped
        on = theirs[key].dataset.name
        why = "no comparable value" if key.metric in METRICS else "an unknown metric, no direction"
        checked.append(f"not compared: {key.metric} of {other_ref} on {on} ({mine_ref}: {why})")
    return checked


def promote(
    registry: Registry,
    ref: str,
    tag: str,
    requires: Sequence[str] = (),
    better_than: str | None = None,
    *,
    data: str | Path | None = None,
):
    """Point ``NAME@tag`` at ``ref`` if it passes :func:`check_gate` (the version checked is
    the version tagged); returns ``(version, lines checked)``. A refusal moves nothing."""
    registry.require()  # a write: a home with no registry is refused as such, before the ref
    v = registry.get(ref)
    if not (requires or better_than is not None):
        return registry.tag(v.ref, tag), []
    try:  # where the tag is as the gate reads it: it moves only from there
        before: int | None = registry.get(f"{v.name}@{tag}").version
    except NotFoundError:
        before = None
    checked = check_gate(registry, v.ref, requires, better_than, data=data, tag=tag)
    return registry.tag(v.ref, tag, expect=before), checked
