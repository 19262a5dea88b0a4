"""The worker side of ``adaptr serve``: each choice of a request is a :class:`Job` for the
server's :class:`~adaptr.serving.scheduler.Scheduler` (continuous batching: it joins the
running batch at the next decoding step and leaves the step it finishes).

A job's events (text pieces, its end or error) come from the worker thread and are put on
the asyncio queue ``out`` of its request (shared by the request's choices) for the
request's handler, as ``(index, kind, value, logprobs)``: ``logprobs`` is how many of the
job's :attr:`~Request.token_logprobs` the text so far covers. ``Batcher`` is the scheduler
itself (the name the app and its tests have used).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from adaptr.serving.scheduler import Event, Request, Scheduler

Batcher = Scheduler

__all__ = ["Batcher", "Job"]


@dataclass(eq=False)
class Job(Request):
    """A choice of an HTTP request: its events go to ``out`` on the app's event ``loop``."""

    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0  # its choice's index in the answer
    prompt_index: int = 0  # its prompt's, in the request's prompts
    chat: bool = False  # a chat completion (log-probabilities in chat's shape)
    text_offset: int = 0  # where its next log-probabilities' tokens begin in its text
    as_ids: bool = False  # tokens named token_id:N in its log-probabilities
    scorer: Job | None = None  # the choice of its prompt that scores the prompt (None: itself)

    def __post_init__(self) -> None:
        self.on_event = self._to_loop

    def _to_loop(self, event: Event) -> None:
        # (on the worker thread, as the event happens: the count of entries matches the text)
        item = (self.index, *event, len(self.token_logprobs))
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)
