"""What a completion asks of the engine and what it gets back: a leaf module of values.

:class:`Request` is one completion (its prompt's ids, adapter, limits, sampling and
listener); :class:`ServedAdapter` is the adapter version a request runs with, resolved
once by the engine from the request's ref; :class:`Sampling` and :class:`TokenLogprob`
are the small values they carry.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adaptr.registry import AdapterVersion
    from adaptr.serving.constrain import Guide
    from adaptr.serving.peft_fallback import Traits

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the ``top`` most likely tokens at its
    position (``(token id, log-probability)``, most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Sampling:
    """How a request picks its tokens: temperature 0 is greedy; ``seed`` makes sampling
    reproducible (the same tokens alone or in any batch)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class ServedAdapter:
    """An adapter version as the engine serves it, resolved once from a ref (``NAME``,
    ``NAME@N``, ``NAME@tag``): its exact ``ref`` (``NAME@N``, what it is known by), its
    registry version and what PEFT needs to know to batch it. Equal (and hashed) by ref."""

    ref: str
    version: AdapterVersion = field(compare=False, repr=False)
    traits: Traits = field(compare=False, repr=False)


Event = tuple[str, Any]  # ("text", new text) | ("end", finish reason) | ("error", exception)


@dataclass(eq=False)
class Request:
    """One completion: its prompt's token ids, adapter ref (None: the bare base), limits.

    ``on_event`` (called on the worker thread) gets ``("text", piece)`` as text is ready,
    then ``("end", reason)`` (``"stop"``, ``"length"``, ``"cancelled"``) or ``("error", e)``.
    ``tokens`` are the generated ids (EOS left out), ``text`` the completion (cut before a
    stop string); :meth:`wait` blocks until it is finished.

    ``logprobs`` (k, or None: none) fills ``token_logprobs``: one :class:`TokenLogprob` per
    generated token, an EOS that ended it included, each with its k most likely
    alternatives; ``prompt_logprobs`` fills ``prompt_token_logprobs`` likewise for the
    prompt (None for its first token, which nothing predicts). ``max_tokens`` may be 0 with
    ``prompt_logprobs``: the prompt is scored and nothing generated.

    ``constraint`` (structured output: :mod:`adaptr.serving.constrain`) masks each step's
    choice to what its grammar allows next; the request ends ("stop") when the grammar is
    complete, and EOS is chosen only where it accepts.

    ``served`` is the adapter the scheduler resolved ``adapter`` to (once, when the request
    is first considered; ``resolved`` says whether it has been).
    """

    prompt_ids: list[int]
    adapter: str | None = None
    max_tokens: int = 16
    sampling: Sampling = Sampling()
    stop: tuple[str, ...] = ()
    on_event: Callable[[Event], None] | None = None
    keep_logits: bool = False  # keep each step's logits (float32) in ``logits``
    logprobs: int | None = None
    prompt_logprobs: bool = False
    ignore_eos: bool = False  # generate max_tokens whatever comes (benchmarks)
    eos_tokens: frozenset[int] | None = None  # the tokens that end it (None: the model's EOS)
    min_tokens: int = 0  # before these many, no EOS is chosen and no stop string ends it
    constraint: Guide | None = None  # its grammar (structured output): it chooses only what it allows
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of text handed out
    finish: str | None = None
    end_token: int | None = None  # the EOS that ended it (not in ``tokens``)
    error: BaseException | None = None
    cancelled: bool = False
    logits: list = field(default_factory=list)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_token_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    served: ServedAdapter | None = None
    resolved: bool = False

    @property
    def completion_tokens(self) -> int:
        """Tokens generated, an EOS that ended it included (as vLLM and OpenAI count them)."""
        return len(self.tokens) + (self.end_token is not None)

    def cancel(self) -> None:
        """Stop generating for it: dropped before it starts, else its row leaves at the next step."""
        self.cancelled = True

    def wait(self, timeout: float | None = None) -> Request:
        if not self.done.wait(timeout):
            raise TimeoutError(f"the request did not finish within {timeout:g} s")
        if self.error is not None:
            raise self.error
        return self

    def emit(self, kind: str, value: Any) -> None:
        """Hand ``(kind, value)`` to the listener (its failure is logged, not raised)."""
        if self.on_event is not None:
            try:
                self.on_event((kind, value))
            except Exception:  # a listener's failure is not the batch's
                log.exception("a request's listener failed")
