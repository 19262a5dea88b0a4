"""Score adapter versions on held-out data and store the scores on each version.

Every ref of one call shares a base and is scored in the same mixed-adapter batches of
:class:`adaptr.serving.AdapterServer` (each record runs once per adapter, all adapters in
one batch), the bare base too with ``base_line``. The metrics are those of
:mod:`adaptr.evaluation.metrics`. Records are stored append-only on each version
(:meth:`Registry.add_evals`, typed in :mod:`adaptr.evaluation.records`) with the dataset's
SHA-256, format, settings, library versions and time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adaptr.errors import InvalidInputError, brief
from adaptr.evaluation.metrics import (
    GENERATION,
    auto_bleu_tokenize,
    check_bleu_tokenize,
    parse_metrics,
    text_scores,
)
from adaptr.evaluation.records import DatasetInfo, EvalRecord, data_file
from adaptr.registry import Registry

if TYPE_CHECKING:
    from adaptr.data.sft import DataSplits, LossTokens

EVAL_LIBRARIES = ("adaptr", "torch", "transformers", "peft", "trl", "sacrebleu")
CHAT_KINDS = ("messages", "conversational prompt-completion")
Progress = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    """What one evaluation measured: per ref (``None``: the bare base) its metric values."""

    scores: dict[str | None, dict[str, float]]
    dataset: dict[str, Any]
    settings: dict[str, Any]
    signatures: dict[str, str] = field(default_factory=dict)
    records: list[EvalRecord] = field(default_factory=list)  # what was stored, one per version
    generations: dict[str | None, list[str]] = field(default_factory=dict)  # not stored
    notes: list[str] = field(default_factory=list)  # e.g. the BLEU tokenizer auto picked

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": [{"ref": ref or "(base)", **m} for ref, m in self.scores.items()],
            "dataset": self.dataset, "settings": self.settings,
            "signatures": self.signatures, "stored": len(self.records), "notes": self.notes,
        }  # fmt: skip


@dataclass
class _Inputs:
    """What one evaluation reads before any model runs."""

    path: Path
    splits: DataSplits
    prompts: list  # for generation: prompt strings, or chats before the last assistant turn
    references: list[str]
    base_path: str
    tokenizer: Any
    family: Any  # the base's ModelFamily, or None
    loss: LossTokens  # which tokens carry loss, as training sets them


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
    progress: Progress | None = None,
    bleu_tokenize: str = "auto",
) -> EvalResult:
    """Score the versions ``refs`` (one base) on ``data`` and store the scores on each.

    ``bleu_tokenize``: sacrebleu's tokenizer for BLEU (``13a``, ``intl``, ``zh``, ``char``,
    ``none``, ``ja-mecab``… where installed); ``auto`` takes ``zh`` when the references are
    mostly Chinese (``ja-mecab``/``char`` Japanese, ``ko-mecab``/``13a`` Korean), else ``13a``.
    The one used is stored in the settings and sacrebleu's signature (``tok:``).

    ``progress(stage, done, total)`` hears each finished batch (loss) or record
    (generation). Raises one-line :class:`~adaptr.errors.AdaptrError`\\ s on bad input,
    before anything is stored.
    """
    registry = registry or Registry()
    wanted = _check_arguments(metrics, bleu_tokenize, batch_size, max_new_tokens, limit)
    versions = _versions(registry, refs)
    generation = [m for m in wanted if m in GENERATION]
    got = _load(registry, versions[0], data, format, options or {}, limit, bool(generation))
    from adaptr.evaluation import preference

    preference.check_metrics(got.splits.kind, wanted, format)
    if got.splits.kind in CHAT_KINDS or preference.is_chat(got.splits):
        got.tokenizer.chat_template = _one_chat_template(
            registry, versions, got.tokenizer, got.base_path, base_line
        )
    settings, notes, bleu_tokenize = _settings(
        got, wanted, bleu_tokenize, batch_size, limit, options or {}, max_new_tokens
    )
    tokenized = None
    if "loss" in wanted or "ppl" in wanted:
        tokenized = _tokenized(got.splits.train, got.tokenizer, got.loss.sft())
    pairs = None
    if any(m in preference.PREFERENCE for m in wanted):
        pairs = preference.pair_rows(got.splits, got.tokenizer)

    rows: list[str | None] = [v.ref for v in versions] + ([None] if base_line else [])
    scores, signatures, hyps = _score(
        registry, versions, got, rows, wanted, tokenized, batch_size, max_new_tokens,
        progress, bleu_tokenize, pairs,
    )  # fmt: skip
    dataset = DatasetInfo(
        str(got.path.resolve()), got.splits.info["sha256"], format, got.splits.kind,
        len(got.splits.records),
    )  # fmt: skip
    result = EvalResult(
        {r: {m: scores[r][m] for m in wanted} for r in rows},
        dataset.to_dict(),
        settings,
        signatures,
        generations=hyps,
        notes=notes,
    )
    if store:
        result.records = _store(registry, result, dataset, got.family)
    return result


def _versions(registry: Registry, refs: Sequence[str]) -> list:
    """The versions ``refs`` name (one base), each once."""
    from adaptr.inference import versions_on_one_base

    seen: set[str] = set()
    return [
        v for v in versions_on_one_base(registry, list(refs)) if not (v.ref in seen or seen.add(v.ref))
    ]  # fmt: skip


def _check_arguments(
    metrics, bleu_tokenize: str, batch_size: int, max_new_tokens: int, limit
) -> list[str]:
    """The metrics asked for; one-line errors for arguments that cannot work together."""
    wanted = parse_metrics(metrics)
    bleu_tokenize = check_bleu_tokenize(bleu_tokenize)
    if bleu_tokenize != "auto" and "bleu" not in wanted:
        raise InvalidInputError(
            f"a BLEU tokenizer ({bleu_tokenize!r}) was given but BLEU is not among the metrics "
            f"({', '.join(wanted)}): add bleu, or leave the tokenizer out"
        )
    if batch_size < 1 or max_new_tokens < 1:
        raise InvalidInputError("batch_size and max_new_tokens must be at least 1")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidInputError(
            f"limit (--limit) must be a whole number of records, at least 1, got {brief(limit)}; "
            "leave it out to use every record"
        )
    return wanted


def _load(
    registry: Registry, version, data, format: str, options: dict, limit, generation: bool
) -> _Inputs:
    """The data as training formats it, its references (for generation), and the base's
    tokenizer and family: the calls evaluation shares with training, in one place."""
    from adaptr.bases import base_location, load_tokenizer
    from adaptr.data.sft import DataSettings, load_splits, loss_tokens

    path = data_file(data)
    splits = load_splits(
        DataSettings(path=str(path), format=format, options=options, limit=limit), 42
    )
    if not splits.records:
        raise InvalidInputError(f"{path} has no records to evaluate on")
    prompts, references = (
        _references(splits.records, splits.kind, format) if generation else ([], [])
    )
    base_path = base_location(registry, version)
    tokenizer, family = load_tokenizer(base_path)
    loss = loss_tokens(splits.kind)
    return _Inputs(path, splits, prompts, references, base_path, tokenizer, family, loss)


def _settings(
    got: _Inputs, wanted, bleu_tokenize: str, batch_size: int, limit, options, max_new_tokens
) -> tuple[dict[str, Any], list[str], str]:
    """The settings stored with the scores, notes for the user, and the BLEU tokenizer
    (``auto`` resolved from the references)."""
    settings: dict[str, Any] = {
        "loss_tokens": got.loss.carried_by,
        "batch_size": batch_size, "limit": limit, "options": options,
    }  # fmt: skip
    notes: list[str] = []
    if any(m in GENERATION for m in wanted):
        settings.update(decoding="greedy", max_new_tokens=max_new_tokens)
    if "bleu" in wanted:
        if bleu_tokenize == "auto":
            bleu_tokenize, why = auto_bleu_tokenize(got.references)
            notes += [why] if why else []
        settings["bleu_tokenize"] = bleu_tokenize
    return settings, notes, bleu_tokenize


def _score(
    registry,
    versions,
    got: _Inputs,
    rows,
    wanted,
    tokenized,
    batch_size,
    max_new_tokens,
    progress,
    bleu_tokenize: str,
    pairs=None,
) -> tuple[dict[str | None, dict[str, float]], dict[str, str], dict[str | None, list[str]]]:
    """Each row's scores (loss in mixed batches, then greedy generations scored against the
    references), sacrebleu's signatures and the generations."""
    from adaptr.serving import AdapterServer

    server = AdapterServer(
        registry, versions[0].base or got.base_path, max_adapters=max(1, len(versions))
    )
    scores: dict[str | None, dict[str, float]] = {r: {} for r in rows}
    if tokenized is not None:
        _score_losses(server, tokenized, rows, wanted, batch_size, progress, scores)
    if pairs is not None:  # preference pairs: pref_acc, pref_margin
        from adaptr.evaluation.preference import preference_scores

        for ref, got_scores in preference_scores(server, pairs, rows, wanted, batch_size, progress).items():
            scores[ref].update(got_scores)
    signatures: dict[str, str] = {}
    hyps: dict[str | None, list[str]] = {}
    generation = [m for m in wanted if m in GENERATION]
    if generation:
        hyps = _generate(server, got, rows, batch_size, max_new_tokens, progress)
        for ref in rows:
            done, signatures = text_scores(hyps[ref], got.references, generation, bleu_tokenize)
            scores[ref].update(done)
    return scores, signatures, hyps


def _score_losses(server, tokenized, rows, wanted, batch_size, progress, scores) -> None:
    """``loss`` and ``ppl`` of each row into ``scores``."""
    for ref, loss in _losses(server, tokenized, rows, batch_size, progress).items():
        if "loss" in wanted:
            scores[ref]["loss"] = loss
        if "ppl" in wanted:
            scores[ref]["ppl"] = math.exp(loss) if loss < 700 else float("inf")


def _generate(server, got: _Inputs, rows, batch_size, max_new_tokens, progress) -> dict:
    """Each row's greedy generation for every prompt (chats rendered through the template,
    stopping at its end-of-turn token too)."""
    prompts = got.prompts
    if got.splits.kind == "messages" or prompts and isinstance(prompts[0], list):
        prompts = [_render_chat(got.tokenizer, p) for p in prompts]
        stops = _end_of_turn(got.tokenizer)
    else:
        stops = None
    return _generations(server, prompts, rows, batch_size, max_new_tokens, progress, stops)


def _store(
    registry: Registry, result: EvalResult, dataset: DatasetInfo, family
) -> list[EvalRecord]:
    """One record per evaluated version (the bare base's scores ride along on each)."""
    from adaptr.runtime import library_versions

    created = time.time()
    libs = library_versions(EVAL_LIBRARIES)
    base_line = result.scores.get(None) if None in result.scores else None
    records = [
        (ref, EvalRecord(
            metrics=scores, dataset=dataset, settings=result.settings,
            signatures={k: s for k, s in result.signatures.items() if k in scores},
            libraries=libs, family=family.name if family else None, created=created,
            base_line=base_line,
        ).to_dict())
        for ref, scores in result.scores.items()
        if ref is not None
    ]  # fmt: skip
    return [EvalRecord.from_dict(d) for d in registry.add_evals(records)]


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


def _tokenized(dataset, tokenizer, sft: dict[str, Any]):
    import tempfile

    from adaptr.data.sft import tokenize
    from adaptr.training.trainer import sft_config

    with tempfile.TemporaryDirectory() as tmp:
        args = sft_config(sft, Path(tmp) / "unused")
    return tokenize(dataset, tokenizer, args, "eval")


def _one_chat_template(registry, versions, tokenizer, base_path: str, base_line: bool) -> str:
    """The chat template every evaluated row was trained with (as serving renders it: the
    version's stored one, else the base's, else the family's). Chat data is rendered and
    tokenized once for all rows, so rows trained with different templates are refused."""
    from transformers import AutoConfig

    from adaptr.inference import NO_TEMPLATE, chat_template

    config = AutoConfig.from_pretrained(base_path)
    found = {v.ref: chat_template(registry, [v], tokenizer, config) for v in versions}
    if base_line:
        found["the bare base"] = chat_template(registry, [], tokenizer, config)
    missing = [ref for ref, t in found.items() if not t]
    if missing:
        raise InvalidInputError(
            f"{', '.join(missing)} {NO_TEMPLATE}: chat data cannot be rendered for it; "
            "evaluate on prompt/completion text instead"
        )
    if len(set(found.values())) > 1:
        raise InvalidInputError(
            f"{', '.join(found)} were trained with different chat templates, and chat data is "
            "rendered once for all of them: evaluate each template's versions in a run of their own"
        )
    return next(iter(found.values()))


def _render_chat(tokenizer, messages: list[dict]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template error: jinja raises its own types
        raise InvalidInputError(f"the chat template cannot render a record: {e}") from None


def _losses(server, tokenized, refs: list, batch_size: int, progress) -> dict:
    """Mean NLL per loss token of each ref over the data: records x refs in each batch."""
    from adaptr.evaluation.scoring import chunks, labelled_nll

    ids_all, labels_all = tokenized["input_ids"], tokenized["labels"]
    total = {r: 0.0 for r in refs}
    count = {r: 0 for r in refs}
    pieces = list(chunks(len(ids_all), batch_size))
    for done, chunk in enumerate(pieces, 1):
        cells = [(i, r) for i in chunk for r in refs]
        sums, counts = labelled_nll(
            server, [(ids_all[i], labels_all[i]) for i, _ in cells], [r for _, r in cells]
        )
        for (_, r), s, c in zip(cells, sums, counts, strict=True):
            total[r] += s
            count[r] += c
        if progress:
            progress("loss", done, len(pieces))
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
    """Each ref's greedy completion of every prompt: all queued at once on the server's
    scheduler, up to ``batch_size`` records x refs decoding together (continuous batching:
    a finished row's place goes to the next at once), records in order, so the rows of one
    record (one prompt length) start together."""
    scheduler = server.scheduler
    before, scheduler.max_batch = scheduler.max_batch, max(1, batch_size * len(refs))
    extra = {"eos_token_id": stops} if stops else {}
    requests = [
        [server.submit(prompt, r, max_new_tokens=max_new_tokens, **extra) for r in refs]
        for prompt in prompts
    ]
    out: dict[str | None, list[str]] = {r: [""] * len(prompts) for r in refs}
    try:
        for i, row in enumerate(requests):
            for r, request in zip(refs, row, strict=True):
                out[r][i] = request.wait().text
            if progress:
                progress("generate", i + 1, len(prompts))
    finally:
        for row in requests:
            for request in row:
                request.cancel()  # (the rest, when one failed or the caller was interrupted)
        scheduler.max_batch = before
    return out
