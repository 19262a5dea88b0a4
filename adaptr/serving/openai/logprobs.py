"""Log-probabilities in OpenAI's two shapes: completions' (``tokens``, ``token_logprobs``,
``top_logprobs``, ``text_offset``) and chat's (``content``: token, logprob, bytes,
``top_logprobs``).

A token's text is its own decoding (special tokens included, so an EOS shows as itself);
log-probabilities are floored at -9999 as vLLM does (JSON has no -Infinity). In the
completions shape ``top_logprobs`` maps texts to log-probabilities, so of two tokens with
one text only the likelier shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from ..scheduler import TokenLogprob

FLOOR = -9999.0


class TokenTexts:
    """Each token id's text, decoded once."""

    def __init__(self, tokenizer):
        self.text = lru_cache(maxsize=65536)(
            lambda token: tokenizer.decode([token], skip_special_tokens=False)
        )


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion(
    tokens: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    texts: TokenTexts,
    offset: int = 0,
) -> dict:
    """The completions shape of ``tokens`` and their ``entries`` (None: a first prompt token,
    which nothing predicts); ``offset`` is where the first token's text begins in the
    choice's text."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(tokens, entries, strict=True):
        token = texts.text(token_id)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(token)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for t, v in entry.top:  # tokens of one text: the likelier one's (the first) stays
            top.setdefault(texts.text(t), _value(v))
        top.setdefault(token, _value(entry.logprob))  # the chosen token, always (vLLM's way)
        out["token_logprobs"].append(_value(entry.logprob))
        out["top_logprobs"].append(top)
    return out


def chat(entries: Sequence[TokenLogprob], texts: TokenTexts) -> dict:
    """The chat shape of ``entries``: ``{"content": [...]}``."""

    def one(token: int, logprob: float) -> dict:
        text = texts.text(token)
        return {"token": text, "logprob": _value(logprob), "bytes": list(text.encode())}

    content = [
        {**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries
    ]
    return {"content": content}
