"""Text out of tokens: incremental decoding and stop strings (a leaf module).

:class:`Detokenizer` decodes a few tokens per step, never the whole completion;
:func:`find_stop` finds a stop string and :func:`held_back` says how much of the text so
far could still begin one (held back until it cannot).
"""

from __future__ import annotations


class Detokenizer:
    """Incremental decoding: each token's new text from the few tokens around it.

    Decodes ``ids[prefix:]`` and ``ids[prefix:read]`` and hands out the difference (the
    scheme of TGI and vLLM), so a token costs a decode of a short window, and text whose
    UTF-8 character is incomplete (``\\ufffd``) waits for the token that completes it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        """The text that ``token`` completes ("" while a character is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """What is left undecoded at the end (an incomplete character, as ``\\ufffd``)."""
        before = self._decode(self.ids[self.prefix : self.read])
        now = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if now.startswith(before) else ""


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest of ``stops`` begins in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters of ``text`` could begin a stop string (not sent yet)."""
    longest = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:k]):
                longest = k
                break
    return longest


def unchecked(text: str, stops: tuple[str, ...]) -> int:
    """Where a stop string ending in text added next could begin: the text before was
    checked already (or not to be checked), but its last characters may start one."""
    return max(0, len(text) - max((len(s) for s in stops), default=1) + 1)
