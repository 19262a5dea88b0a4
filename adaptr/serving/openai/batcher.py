"""The worker side of ``adaptr serve``: each request is a :class:`Job` for the server's
:class:`~adaptr.serving.scheduler.Scheduler` (continuous batching: it joins the running
batch at the next decoding step and leaves the step it finishes).

A job's events (text pieces, its end or error) come from the worker thread and are put on
its asyncio queue ``out`` for the request's handler. ``Batcher`` is the scheduler itself
(the name the app and its tests have used).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..scheduler import Event, Request, Scheduler

Batcher = Scheduler

__all__ = ["Batcher", "Job"]


@dataclass(eq=False)
class Job(Request):
    """A request of the HTTP app: its events go to ``out`` on the app's event ``loop``."""

    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)

    def __post_init__(self) -> None:
        self.on_event = self._to_loop

    def _to_loop(self, event: Event) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, event)
