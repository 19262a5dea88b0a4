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

from adaptr.serving.requests import TokenLogprob

FLOOR = -9999.0


class TokenTexts:
    """Each token id's text, decoded once; with ``as_ids`` (vLLM's
    ``return_tokens_as_token_ids``) a token is named ``token_id:N`` instead, so tokens that
    decode alike (byte tokens of one character) stay apart."""

    def __init__(self, tokenizer):
        self.text = lru_cache(maxsize=65536)(
            lambda token: tokenizer.decode([token], skip_special_tokens=False)
        )

    def name(self, token: int, as_ids: bool) -> str:
        return f"token_id:{token}" if as_ids else self.text(token)


def _value(logprob: float) -> float:
    return max(logprob, FLOOR)


def completion(
    tokens: Sequence[int],
    entries: Sequence[TokenLogprob | None],
    texts: TokenTexts,
    offset: int = 0,
    as_ids: bool = False,
) -> dict:
    """The completions shape of ``tokens`` and their ``entries`` (None: a first prompt token,
    which nothing predicts); ``offset`` is where the first token's text begins in the
    choice's text (offsets count the tokens' texts, whatever names them)."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, entry in zip(tokens, entries, strict=True):
        token = texts.name(token_id, as_ids)
        out["tokens"].append(token)
        out["text_offset"].append(offset)
        offset += len(texts.text(token_id))
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        top: dict[str, float] = {}
        for t, v in entry.top:  # tokens of one text: the likelier one's (the first) stays
            top.setdefault(texts.name(t, as_ids), _value(v))
        top.setdefault(token, _value(entry.logprob))  # the chosen token, always (vLLM's way)
        out["token_logprobs"].append(_value(entry.logprob))
        out["top_logprobs"].append(top)
    return out


def chat(entries: Sequence[TokenLogprob], texts: TokenTexts, as_ids: bool = False) -> dict:
    """The chat shape of ``entries``: ``{"content": [...]}`` (``bytes``: the token's text's)."""

    def one(token: int, logprob: float) -> dict:
        text = texts.text(token)
        return {"token": texts.name(token, as_ids), "logprob": _value(logprob),
                "bytes": list(text.encode())}  # fmt: skip

    content = [
        {**one(e.token, e.logprob), "top_logprobs": [one(t, v) for t, v in e.top]} for e in entries
    ]
    return {"content": content}
