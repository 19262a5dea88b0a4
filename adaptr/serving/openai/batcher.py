"""The worker side of ``adaptr serve``: requests wait as :class:`Job` s, one thread batches them.

Concurrent requests are gathered for a few ms and generated as one batch across adapters;
each row's tokens go back to its request as they come. A job whose client went away is
dropped before its batch starts, and its row stops generating if the batch has started.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ...errors import AdaptrError
from ..server import AdapterServer

log = logging.getLogger(__name__)

MAX_BATCH = 32
BATCH_WINDOW_S = 0.01


@dataclass
class Job:
    """One request waiting for (or in) a batch; tokens arrive on ``out`` as they are generated."""

    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int
    sampling: tuple
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False  # the request wants no more tokens (a stop string, a client gone)
    tokens: int = 0  # tokens generated for it so far

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class _BatchStreamer(StoppingCriteria):
    """A transformers streamer that hands each row's new token to its job.

    Also a stopping criterion: a row is finished once its job has its tokens (EOS, its own
    ``max_tokens``) or wants no more (a stop string, a client gone), and the batch ends
    when every row is, not at the longest request's ``max_tokens``.
    """

    def __init__(self, jobs: list[Job], eos: int | None):
        self.jobs, self.eos, self.first = jobs, eos, True
        self.counts = [0] * len(jobs)
        self.done = [False] * len(jobs)

    def put(self, value) -> None:
        if self.first:  # the prompt ids
            self.first = False
            return
        for i, tok in enumerate(value.reshape(-1).tolist()):
            job = self.jobs[i]
            if self.done[i] or job.cancelled:
                continue
            if tok == self.eos:
                self.done[i] = True
                job.emit(("end", "stop"))
                continue
            self.counts[i] += 1
            job.emit(("token", tok))
            if self.counts[i] >= job.max_tokens:
                self.done[i] = True
                job.emit(("end", "length"))

    @property
    def emitted(self) -> bool:
        """Whether any job has had a token or its end yet."""
        return any(self.counts) or any(self.done)

    def end(self) -> None:
        for i, job in enumerate(self.jobs):
            if not self.done[i]:
                self.done[i] = True
                job.emit(("end", "stop"))

    def __call__(self, input_ids, scores, **kwargs: Any):
        flags = [d or j.cancelled for d, j in zip(self.done, self.jobs, strict=True)]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


_HOLD = object()  # a queue marker: the worker waits for release() when it reaches it
_STOP = object()  # a queue marker: the worker ends when it reaches it (close())


class Batcher:
    """One worker thread: gathers waiting jobs for a few ms, then generates them as one batch
    (until :meth:`close`).

    ``submitted`` and ``dropped`` count the jobs queued and the ones dropped unstarted
    (their client went away); ``current`` is the batch being generated; ``most_rows`` and
    ``most_models`` are the largest batch so far and the most models in one batch.
    """

    def __init__(self, server: AdapterServer):
        self.server = server
        self.jobs: queue.Queue = queue.Queue()
        self.submitted = self.dropped = 0
        self.current: list[Job] = []
        self.most_rows = self.most_models = 0
        self._open = threading.Event()
        self._open.set()
        self.thread = threading.Thread(target=self._run, daemon=True, name="adaptr-batcher")
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)
        self.submitted += 1

    def hold(self) -> None:
        """Let jobs queue up without starting them until :meth:`release` (the batch that
        is running finishes). Jobs queued meanwhile then start together, up to MAX_BATCH."""
        self._open.clear()
        self.jobs.put(_HOLD)

    def release(self) -> None:
        self._open.set()

    def close(self, timeout: float | None = None) -> bool:
        """End the worker thread once the jobs queued before this call are done (or
        dropped), waiting up to ``timeout`` s for it; whether it has ended."""
        self.jobs.put(_STOP)
        self._open.set()
        self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            if first is _STOP:
                return
            if first is _HOLD:
                self._open.wait()
                continue
            batch, mark = self._gather(first)
            try:
                self._generate_all(batch)
            except Exception as e:  # never let the worker die: every later request would hang
                log.exception("the batch worker failed on a batch of %d", len(batch))
                for j in batch:
                    j.emit(("error", e))
            if mark is _STOP:
                return
            if mark is _HOLD:
                self._open.wait()

    def _gather(self, first: Job) -> tuple[list[Job], object | None]:
        """``first`` and the jobs that come within the batch window, less the cancelled
        ones; and the marker that ended the window early (a :meth:`hold`, a :meth:`close`)."""
        batch = [] if self._drop(first) else [first]
        deadline = time.monotonic() + BATCH_WINDOW_S
        while len(batch) < MAX_BATCH:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is _HOLD or job is _STOP:
                return batch, job
            if not self._drop(job):
                batch.append(job)
        return batch, None

    def _drop(self, job: Job) -> bool:
        if job.cancelled:
            self.dropped += 1
        return job.cancelled

    def _generate_all(self, batch: list[Job]) -> None:
        groups: dict[tuple, list[list[Job]]] = {}
        for job in batch:
            parts = groups.setdefault(job.sampling, [[]])
            # a new batch when this one's adapters would not all stay resident
            adapters = {j.adapter for j in parts[-1]} | {job.adapter}
            if len(adapters - {None}) > self.server.max_adapters:
                parts.append([])
            parts[-1].append(job)
        for sampling, parts in groups.items():
            for jobs in parts:
                self._generate(jobs, sampling)

    def _generate(self, jobs: list[Job], sampling: tuple) -> None:
        # every part (and every retry) checks again: a client may leave while another part runs
        jobs = [j for j in jobs if not self._drop(j)]
        if not jobs:
            return
        parts = self.server.partition([j.adapter for j in jobs], len(jobs))
        if len(parts) > 1:  # adapters PEFT must run apart (DoRA, ...)
            for part in parts:
                self._generate([jobs[i] for i in part], sampling)
            return
        try:
            self._batch(jobs, sampling)
        except _NotStarted as e:  # an adapter that cannot be loaded: fail its own jobs only
            by_adapter: dict[str | None, list[Job]] = {}
            for j in jobs:
                by_adapter.setdefault(j.adapter, []).append(j)
            if len(by_adapter) == 1:
                for j in jobs:
                    j.emit(("error", e.error))
            else:
                for part in by_adapter.values():
                    self._generate(part, sampling)
        except Exception as e:  # reported to every waiting request; the worker keeps serving
            log.exception("generation failed for a batch of %d", len(jobs))
            for j in jobs:
                j.emit(("error", e))

    def _batch(self, jobs: list[Job], sampling: tuple) -> None:
        s = self.server
        do_sample, temperature, top_p = sampling
        kwargs = {"do_sample": do_sample, "max_new_tokens": max(j.max_tokens for j in jobs)}
        if do_sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        adapters = [j.adapter for j in jobs]
        streamer = None
        try:
            with s.batch(adapters, len(jobs), grouped=True) as order:
                self.most_rows = max(self.most_rows, len(jobs))
                self.most_models = max(self.most_models, len(set(adapters)))  # the base too
                jobs = [jobs[i] for i in order]  # each adapter's rows together
                self.current = jobs
                try:
                    streamer = _BatchStreamer(jobs, s.tokenizer.eos_token_id)
                    # left padding (the server's tokenizer is set up for it)
                    enc = s.tokenizer.pad(
                        {"input_ids": [j.prompt_ids for j in jobs]}, return_tensors="pt"
                    )
                    s.model.generate(**enc, pad_token_id=s.tokenizer.pad_token_id, streamer=streamer,
                                     stopping_criteria=StoppingCriteriaList([streamer]), **kwargs)  # fmt: skip
                finally:
                    self.current = []
        except AdaptrError as e:
            if streamer is None or not streamer.emitted:
                raise _NotStarted(e) from e
            raise
        streamer.end()


class _NotStarted(Exception):
    """A batch refused before any token went out (so its jobs can be retried apart)."""

    def __init__(self, error: AdaptrError):
        super().__init__(str(error))
        self.error = error
