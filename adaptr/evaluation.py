"""Score adapter versions on held-out data, store the scores, compare versions, gate tag moves.

Every ref of one call shares a base and is scored in the same mixed-adapter batches of
:class:`adaptr.serving.AdapterServer` (each record runs once per adapter, all adapters in
one batch), the bare base too with ``base_line``.

Metrics (higher is better unless said):

- ``loss`` (lower): mean negative log-likelihood per loss token, over all loss tokens of the
  data. The tokens and loss masks are the ones training uses (:func:`adaptr.sft_data.tokenize`,
  TRL's own preparation): the completion of prompt/completion data, the assistant turns of chat
  data, every token of plain text.
- ``ppl`` (lower): ``exp(loss)``.
- ``exact``, ``chrf``, ``bleu``, ``rougeL`` (need references: prompt/completion or chat data):
  on greedy generations from the prompt (chat: the conversation before the last assistant turn
  through the template, stopping at EOS or the template's end-of-turn token). ``exact``:
  percent of generations equal to the reference (whitespace at the ends ignored); ``chrf``
  and ``bleu``: sacrebleu's corpus scores (0-100, signature stored); ``rougeL``: mean
  ROUGE-L F1 over records on lower-cased word tokens, times 100.

Records are stored append-only on each version (:meth:`Registry.add_evals`) with the
dataset's SHA-256, format, settings, library versions and time.
"""

from __future__ import annotations

import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, NotFoundError
from .registry import Registry

METRICS = ("loss", "ppl", "exact", "chrf", "bleu", "rougeL")
GENERATION = ("exact", "chrf", "bleu", "rougeL")
LOWER_IS_BETTER = {"loss", "ppl", "trn_loss", "trn_eval", "trn_ppl"}
TRAINING = ("train_loss", "eval_loss", "perplexity")  # training metrics compare shows
TRAINING_COLUMNS = {"train_loss": "trn_loss", "eval_loss": "trn_eval", "perplexity": "trn_ppl"}
EVAL_LIBRARIES = ("adaptr", "torch", "transformers", "peft", "trl", "sacrebleu")
_ALIASES = {m.lower(): m for m in METRICS} | {"perplexity": "ppl", "rouge-l": "rougeL"}


@dataclass
class EvalResult:
    """What one evaluation measured: per ref (``None``: the bare base) its metric values."""

    scores: dict[str | None, dict[str, float]]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    signatures: dict[str, str] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)  # what was stored, one per version
    generations: dict[str | None, list[str]] = field(default_factory=dict)  # not stored

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": [{"ref": ref or "(base)", **m} for ref, m in self.scores.items()],
            "dataset": self.dataset, "settings": self.settings,
            "signatures": self.signatures, "stored": len(self.records),
        }  # fmt: skip


def parse_metrics(metrics: str | Sequence[str] | None) -> list[str]:
    """``"loss,chrf"`` or a list -> canonical metric names; unknown names are an error."""
    if metrics is None:
        return ["loss", "ppl"]
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        name = _ALIASES.get(item.lower())
        if name is None:
            raise InvalidInputError(f"unknown metric {item!r}: choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InvalidInputError(f"no metric given: choose from {', '.join(METRICS)}")
    return out


# ------------------------------------------------------------------------ metrics
def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(hypothesis: str, reference: str) -> float:
    """ROUGE-L F1 (0-1) of one pair on lower-cased word tokens (LCS-based, as rouge-score)."""
    h, r = _words(hypothesis), _words(reference)
    lcs = _lcs(h, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(h), lcs / len(r)
    return 2 * p * rec / (p + rec)


def text_scores(
    hypotheses: Sequence[str], references: Sequence[str], metrics: Sequence[str]
) -> tuple[dict[str, float], dict[str, str]]:
    """Generation metrics of a corpus and the sacrebleu signatures of those it computed."""
    scores: dict[str, float] = {}
    signatures: dict[str, str] = {}
    hyps, refs = list(hypotheses), list(references)
    if "exact" in metrics:
        same = sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True))
        scores["exact"] = 100.0 * same / len(refs)
    if "chrf" in metrics or "bleu" in metrics:
        from sacrebleu.metrics import BLEU, CHRF

        for name, metric in (("chrf", CHRF()), ("bleu", BLEU())):
            if name in metrics:
                scores[name] = float(metric.corpus_score(hyps, [refs]).score)
                signatures[name] = str(metric.get_signature())
    if "rougeL" in metrics:
        scores["rougeL"] = 100.0 * sum(map(rouge_l, hyps, refs)) / len(refs)
    return scores, signatures


# --------------------------------------------------------------------------- data
def _references(records: list[dict[str, Any]], kind: str, fmt: str) -> tuple[list, list[str]]:
    """(prompts, references) for generation: prompt strings, or the chat before the last
    assistant turn."""
    if kind == "prompt-completion":
        prompts, refs = [], []
        for n, r in enumerate(records, 1):
            if isinstance(r.get("prompt"), list) or isinstance(r.get("completion"), list):
                msgs = list(r["prompt"]) + list(r["completion"])
                r = {"messages": msgs}
            else:
                prompts.append(str(r["prompt"]))
                refs.append(str(r["completion"]))
                continue
            p, ref = _chat_reference(r, n)
            prompts.append(p)
            refs.append(ref)
        return prompts, refs
    if kind == "messages":
        pairs = [_chat_reference(r, n) for n, r in enumerate(records, 1)]
        return [p for p, _ in pairs], [r for _, r in pairs]
    raise InvalidInputError(
        f"generation metrics ({', '.join(GENERATION)}) need references: format {fmt} gives "
        f"{kind} records; use prompt/completion or chat data, or --metrics loss,ppl"
    )


def _chat_reference(record: dict[str, Any], n: int) -> tuple[list[dict], str]:
    msgs = record.get("messages") or []
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=None)
    content = msgs[last].get("content") if last is not None else None
    if not isinstance(content, str) or not content:
        raise InvalidInputError(
            f"record {n} has no assistant answer with text to compare generations with: "
            "every record needs one for the generation metrics"
        )
    return msgs[:last], content


# ------------------------------------------------------------------------ scoring
def evaluate(
    refs: Sequence[str],
    data: str | Path,
    format: str,
    metrics: str | Sequence[str] | None = None,
    *,
    registry: Registry | None = None,
    base_line: bool = False,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    limit: int | None = None,
    options: dict[str, Any] | None = None,
    store: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvalResult:
    """Score the versions ``refs`` (one base) on ``data`` and store the scores on each.

    ``progress(stage, done, total)`` hears each finished batch. Raises one-line
    :class:`~adaptr.errors.AdaptrError`\\ s on bad input, before anything is stored.
    """
    from .inference import base_location, versions_on_one_base
    from .sft_data import load_splits, loss_defaults
    from .trainer import load_tokenizer

    registry = registry or Registry()
    wanted = parse_metrics(metrics)
    if batch_size < 1 or max_new_tokens < 1:
        raise InvalidInputError("batch_size and max_new_tokens must be at least 1")
    versions = versions_on_one_base(registry, list(refs))
    seen: set[str] = set()
    versions = [v for v in versions if not (v.ref in seen or seen.add(v.ref))]
    path = Path(data).expanduser()
    if not path.is_file():
        raise NotFoundError(f"no data file {path}")
    splits = load_splits(
        {"path": str(path), "format": format, "options": options or {}, "limit": limit}, 42
    )
    records = splits.records
    if not records:
        raise InvalidInputError(f"{path} has no records to evaluate on")
    generation = [m for m in wanted if m in GENERATION]
    prompts, references = _references(records, splits.kind, format) if generation else ([], [])
    v0 = versions[0]
    base_path = base_location(registry, v0)
    tokenizer, family = load_tokenizer(base_path, {"trust_remote_code": False, "family": None})
    sft: dict[str, Any] = {}
    loss_defaults(sft, splits.kind)
    settings: dict[str, Any] = {
        "loss_tokens": "assistant" if sft.get("assistant_only_loss") else
        "completion" if sft.get("completion_only_loss") else "all",
        "batch_size": batch_size, "limit": limit, "options": options or {},
    }  # fmt: skip
    if generation:
        settings.update(decoding="greedy", max_new_tokens=max_new_tokens)
    tokenized = None
    if "loss" in wanted or "ppl" in wanted:
        tokenized = _tokenized(splits.train, tokenizer, sft)

    from .serving import AdapterServer

    rows: list[str | None] = [v.ref for v in versions] + ([None] if base_line else [])
    server = AdapterServer(registry, v0.base or base_path, max_adapters=max(1, len(versions)))
    scores: dict[str | None, dict[str, float]] = {r: {} for r in rows}
    if tokenized is not None:
        for ref, loss in _losses(server, tokenized, rows, batch_size, progress).items():
            if "loss" in wanted:
                scores[ref]["loss"] = loss
            if "ppl" in wanted:
                scores[ref]["ppl"] = math.exp(loss) if loss < 700 else float("inf")
    signatures: dict[str, str] = {}
    if generation:
        if splits.kind == "messages" or prompts and isinstance(prompts[0], list):
            prompts = [_render_chat(tokenizer, p) for p in prompts]
            stops = _end_of_turn(tokenizer)
        else:
            stops = None
        hyps = _generations(server, prompts, rows, batch_size, max_new_tokens, progress, stops)
        for ref in rows:
            got, signatures = text_scores(hyps[ref], references, generation)
            scores[ref].update(got)
    dataset = {
        "path": str(path.resolve()), "sha256": splits.info["sha256"], "format": format,
        "kind": splits.kind, "records": len(records),
    }  # fmt: skip
    result = EvalResult(
        {r: {m: scores[r][m] for m in wanted} for r in rows}, dataset, settings, signatures
    )
    if generation:
        result.generations = hyps
    if store:
        created = time.time()
        from .trainer import library_versions

        libs = library_versions(EVAL_LIBRARIES)
        result.records = registry.add_evals(
            [
                (
                    ref,
                    {
                        "metrics": result.scores[ref],
                        "dataset": dataset,
                        "settings": settings,
                        "signatures": {
                            k: s for k, s in signatures.items() if k in result.scores[ref]
                        },
                        "libraries": libs,
                        "family": family.name if family else None,
                        "created": created,
                        "base_line": result.scores.get(None) if base_line else None,
                    },
                )  # fmt: skip
                for ref in rows
                if ref is not None
            ]
        )
    return result


def _tokenized(dataset, tokenizer, sft: dict[str, Any]):
    import tempfile

    from .sft_data import tokenize
    from .trainer import sft_config

    with tempfile.TemporaryDirectory() as tmp:
        args = sft_config(sft, Path(tmp) / "unused", progress=False)
    return tokenize(dataset, tokenizer, args, "eval")


def _render_chat(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template error: jinja raises its own types
        raise InvalidInputError(f"the base's chat template cannot render a record: {e}") from None


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield list(range(start, min(n, start + size)))


def _losses(server, tokenized, refs: list, batch_size: int, progress) -> dict:
    """Mean NLL per loss token of each ref over the data: records x refs in each batch."""
    import torch

    ids_all, labels_all = tokenized["input_ids"], tokenized["labels"]
    total = {r: 0.0 for r in refs}
    count = {r: 0 for r in refs}
    device = server.model.device
    chunks = list(_chunks(len(ids_all), batch_size))
    for done, chunk in enumerate(chunks, 1):
        rows = [(i, r) for i in chunk for r in refs]
        width = max(len(ids_all[i]) for i in chunk)
        pad = server.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for k, (i, _) in enumerate(rows):  # right padding: positions start at 0 in every row
            n = len(ids_all[i])
            ids[k, :n] = torch.tensor(ids_all[i])
            labels[k, :n] = torch.tensor(labels_all[i])
            mask[k, :n] = 1
        adapters = [r for _, r in rows]
        for part in server.partition(adapters, len(rows)):
            with server.batch([adapters[k] for k in part], len(part), grouped=True) as order:
                take = [part[k] for k in order]
                logits = server.model(
                    input_ids=ids[take].to(device), attention_mask=mask[take].to(device)
                ).logits.float()
                target = labels[take][:, 1:].to(device)
                nll = torch.nn.functional.cross_entropy(
                    logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none"
                ).double()
                sums = nll.sum(dim=1).tolist()
                counts = (target != -100).sum(dim=1).tolist()
                for k, s, c in zip(take, sums, counts, strict=True):
                    total[adapters[k]] += s
                    count[adapters[k]] += c
        if progress:
            progress("loss", done, len(chunks))
    if not count[refs[0]]:
        raise InvalidInputError("the data has no loss tokens (every label is masked)")
    return {r: total[r] / count[r] for r in refs}


def _end_of_turn(tokenizer) -> list[int] | None:
    """EOS and the special token the chat template closes an assistant turn with (ChatML's
    ``<|im_end|>``, LLaMA 3's ``<|eot_id|>``…): generation of a chat answer stops at either."""
    marker = "\x00ADAPTR\x00"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except Exception:  # a template that needs more: stop at EOS only
        return None
    after = text.split(marker, 1)[-1] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if t.special
    }
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if ids and ids[0] in special and ids[0] not in stops:
        stops.append(ids[0])
    return stops or None


def _generations(
    server, prompts, refs, batch_size, max_new_tokens, progress, stops: list[int] | None = None
) -> dict:
    out: dict[str | None, list[str]] = {r: [""] * len(prompts) for r in refs}
    chunks = list(_chunks(len(prompts), batch_size))
    extra = {"eos_token_id": stops} if stops else {}
    for done, chunk in enumerate(chunks, 1):
        rows = [(i, r) for i in chunk for r in refs]
        texts = server.generate(
            [prompts[i] for i, _ in rows], [r for _, r in rows], max_new_tokens=max_new_tokens,
            **extra,
        )  # fmt: skip
        for (i, r), text in zip(rows, texts, strict=True):
            out[r][i] = text
        if progress:
            progress("generate", done, len(chunks))
    return out


# -------------------------------------------------------------- stored results
def latest_scores(registry: Registry, ref: str, sha256: str | None = None) -> dict[str, dict]:
    """Per metric, the newest stored record measuring it (on dataset ``sha256`` if given):
    ``{metric: {"value", "dataset", "created"}}``."""
    out: dict[str, dict] = {}
    for rec in registry.evals(ref):
        ds = rec.get("dataset") or {}
        if sha256 and ds.get("sha256") != sha256:
            continue
        for metric, value in (rec.get("metrics") or {}).items():
            out[metric] = {"value": value, "dataset": ds, "created": rec.get("created", 0)}
    return out


_GATE = re.compile(r"^\s*([A-Za-z_]+)\s*(>=|<=|>|<|==)\s*([-+0-9.eE]+)\s*$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}


def check_gate(
    registry: Registry,
    ref: str,
    requires: Sequence[str] = (),
    better_than: str | None = None,
) -> list[str]:
    """Refuse (InvalidInputError, one line naming the metric) unless ``ref``'s stored evals
    meet every ``requires`` condition (``"chrf>=40"``) and are no worse than ``better_than``'s
    on every metric both measured on one dataset. Returns what was checked."""
    v = registry.get(ref)
    mine = latest_scores(registry, v.ref)
    checked = []
    for cond in requires:
        m = _GATE.match(cond)
        if not m:
            raise InvalidInputError(
                f"cannot read the requirement {cond!r}: write METRIC>=VALUE (e.g. chrf>=40)"
            )
        metric = _ALIASES.get(m.group(1).lower())
        if metric is None:
            raise InvalidInputError(
                f"unknown metric {m.group(1)!r} in {cond.strip()!r}: choose from {', '.join(METRICS)}"
            )
        try:
            bound = float(m.group(3))
        except ValueError:
            raise InvalidInputError(f"{cond!r}: {m.group(3)!r} is not a number") from None
        if metric not in mine:
            raise InvalidInputError(
                f"{v.ref} has no stored {metric} to check {cond.strip()!r} against: run "
                f"`adaptr eval {v.ref} --data FILE --format FMT --metrics {metric}` first"
            )
        value = mine[metric]["value"]
        if not _OPS[m.group(2)](value, bound):
            raise InvalidInputError(
                f"{v.ref} fails the requirement {cond.strip()}: its {metric} is {value:.4g}; "
                "the tag was not moved"
            )
        checked.append(f"{metric} {value:.4g} {m.group(2)} {bound:g}")
    if better_than:
        other = registry.get(better_than)
        checked += _better(registry, v.ref, other.ref, better_than)
    return checked


def _better(registry: Registry, mine_ref: str, other_ref: str, label: str) -> list[str]:
    theirs_all = registry.evals(other_ref)
    mine_all = registry.evals(mine_ref)
    shared = {r["dataset"]["sha256"] for r in mine_all if r.get("dataset")} & {
        r["dataset"]["sha256"] for r in theirs_all if r.get("dataset")
    }
    if not shared:
        raise InvalidInputError(
            f"{mine_ref} and {label} ({other_ref}) have no evaluation on the same data: run "
            f"`adaptr eval {mine_ref} {other_ref} --data FILE --format FMT` first"
        )
    newest = max(
        (r for r in mine_all if (r.get("dataset") or {}).get("sha256") in shared),
        key=lambda r: r.get("created", 0),
    )
    sha = newest["dataset"]["sha256"]
    mine, theirs = latest_scores(registry, mine_ref, sha), latest_scores(registry, other_ref, sha)
    checked = []
    for metric in sorted(set(mine) & set(theirs)):
        a, b = mine[metric]["value"], theirs[metric]["value"]
        worse = a > b if metric in LOWER_IS_BETTER else a < b
        if worse:
            raise InvalidInputError(
                f"{mine_ref} is worse than {label} ({other_ref}) on {metric}: {a:.4g} vs {b:.4g} "
                f"on {newest['dataset'].get('path', 'the same data')}; the tag was not moved"
            )
        checked.append(f"{metric} {a:.4g} vs {b:.4g}")
    if not checked:
        raise InvalidInputError(
            f"{mine_ref} and {label} ({other_ref}) share no metric measured on the same data"
        )
    return checked


def compare(
    registry: Registry, refs: Sequence[str], data: str | Path | None = None
) -> dict[str, Any]:
    """Versions x metrics: training metrics and the stored evals on one dataset (``data``'s
    hash, else the dataset of the newest eval among ``refs``); ``best`` per column."""
    from .registry.blobs import hash_file

    versions = [registry.get(r) for r in refs]
    if not versions:
        raise InvalidInputError("give at least one adapter reference")
    sha = None
    if data is not None:
        p = Path(data).expanduser()
        if not p.is_file():
            raise NotFoundError(f"no data file {p}")
        sha = hash_file(p)[0]
    else:
        newest = max(
            (r for v in versions for r in registry.evals(v.ref) if r.get("dataset")),
            key=lambda r: r.get("created", 0),
            default=None,
        )
        sha = newest["dataset"]["sha256"] if newest else None
    rows, columns, dataset = [], [], None
    for v in versions:
        values: dict[str, float] = {}
        for m in TRAINING:
            if isinstance(v.metrics.get(m), (int, float)):
                values[TRAINING_COLUMNS[m]] = v.metrics[m]
        for metric, got in (latest_scores(registry, v.ref, sha) if sha else {}).items():
            values[metric] = got["value"]
            dataset = dataset or got["dataset"]
        rows.append({"ref": v.ref, "tags": v.tags, "metrics": values})
        columns += [c for c in values if c not in columns]
    order = {m: i for i, m in enumerate((*METRICS, *TRAINING_COLUMNS.values()))}
    columns.sort(key=lambda c: order.get(c, len(order)))
    best: dict[str, list[str]] = {}  # column -> the refs with its best value (ties: all)
    for c in columns:
        have = [(r["metrics"][c], r["ref"]) for r in rows if c in r["metrics"]]
        lower = c in LOWER_IS_BETTER
        if len(have) > 1:
            top = (min if lower else max)(value for value, _ in have)
            best[c] = [ref for value, ref in have if value == top]
    return {"dataset": dataset, "sha256": sha, "columns": columns, "rows": rows, "best": best}


# -------------------------------------------------------------------- curves
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


def plot_curves(series: dict[str, dict[str, list]], path: str | Path) -> Path:
    """Draw loss (solid) and eval loss (dashed) per version into a PNG; matplotlib needed."""
    try:
        import matplotlib
    except ImportError:
        raise InvalidInputError(
            "drawing a PNG needs matplotlib: pip install 'adaptr[plot]' (the terminal form needs nothing)"
        ) from None
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    try:
        for ref, s in series.items():
            line = None
            if s["loss"]:
                (line,) = ax.plot(*zip(*s["loss"], strict=True), label=f"{ref} loss")
            if s["eval_loss"]:
                color = line.get_color() if line else None
                ax.plot(*zip(*s["eval_loss"], strict=True), "--", marker="o", color=color,
                        label=f"{ref} eval loss")  # fmt: skip
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        out = Path(path)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """A one-line chart of ``values`` (resampled to at most ``width`` points)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    if len(vals) > width:
        vals = [vals[int(i * len(vals) / width)] for i in range(width)]
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[min(7, int((v - lo) / span * 7.999))] for v in vals)
