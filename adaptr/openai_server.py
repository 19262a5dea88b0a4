"""An OpenAI-compatible HTTP server over :class:`AdapterServer`.

``model`` names an adapter ref (``NAME``, ``NAME@N``, ``NAME@tag``), the base (no adapter)
or ``active`` (the base's active adapter from ``adaptr switch``). Refs are resolved on
every request, so a switch or a new version is served without a restart. Concurrent
requests are batched together across adapters by one worker thread; streaming (SSE)
follows each row of the batch token by token.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import StoppingCriteria, StoppingCriteriaList

from .errors import AdaptrError, InvalidInputError, NotFoundError
from .openai_request import RequestParams, find_stop, held_back, parse_params
from .serving import AdapterServer

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


class Batcher:
    """One worker thread: gathers waiting jobs for a few ms, then generates them as one batch."""

    def __init__(self, server: AdapterServer):
        self.server = server
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.most_rows = self.most_models = 0  # largest batch so far; most models in one batch
        self.thread = threading.Thread(target=self._run, daemon=True, name="adaptr-batcher")
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            deadline = time.monotonic() + BATCH_WINDOW_S
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self.jobs.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple, list[list[Job]]] = {}
            for job in batch:
                if job.cancelled:
                    continue
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
                streamer = _BatchStreamer(jobs, s.tokenizer.eos_token_id)
                # left padding (the server's tokenizer is set up for it)
                enc = s.tokenizer.pad(
                    {"input_ids": [j.prompt_ids for j in jobs]}, return_tensors="pt"
                )
                s.model.generate(**enc, pad_token_id=s.tokenizer.pad_token_id, streamer=streamer,
                                 stopping_criteria=StoppingCriteriaList([streamer]), **kwargs)  # fmt: skip
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


@dataclass
class Reply:
    """The OpenAI-shaped answers to one request: whole, or as SSE chunks."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int

    def _body(self, choices: list, **extra: Any) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def whole(self, text: str, reason: str, completion_tokens: int) -> dict:
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice.update(text=text, logprobs=None)
        return self._body([choice], usage=self.usage(completion_tokens))

    def _sse(self, body: dict) -> str:
        if self.chat:
            body["object"] = "chat.completion.chunk"
        return "data: " + json.dumps(body) + "\n\n"

    def chunk(self, delta: str | dict | None, reason: str | None) -> str:
        """One SSE event: new text (or the chat's opening role), or the finish reason."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
        if self.chat:
            choice["delta"] = (
                delta if isinstance(delta, dict) else {"content": delta} if delta else {}
            )
        else:
            choice.update(text=delta or "", logprobs=None)
        return self._sse(self._body([choice]))

    def usage_chunk(self, completion_tokens: int) -> str:
        """The last event when ``stream_options.include_usage``: no choices, the usage."""
        return self._sse(self._body([], usage=self.usage(completion_tokens)))


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse(
        {"error": {"message": message, "type": kind, "param": param, "code": code}},
        status_code=status,
    )


def create_app(server: AdapterServer):
    """The FastAPI app serving ``server`` (see the module docstring)."""
    app = FastAPI(title="adaptr", version="1")
    batcher = app.state.batcher = Batcher(server)
    registry = server.registry
    context = getattr(server.model.config, "max_position_embeddings", None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ANN001
        return _error(400, f"invalid request: {exc.errors()[0].get('msg', exc)}")

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        ids = [server.base_key]
        for v in registry.list():
            if v.base == server.base_key:
                ids += [v.name, v.ref] + [f"{v.name}@{t}" for t in v.tags]
        seen = list(dict.fromkeys(ids))
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": now, "owned_by": "adaptr"} for i in seen
            ],
        }

    def resolve(model: Any) -> str | None:
        if not isinstance(model, str) or not model:
            raise InvalidInputError("'model' must name an adapter, the base, or 'active'")
        if model == server.base_key:
            return None
        if model == "active":
            refs = registry.active(server.base_key).get(server.base_key, [])
            if len(refs) > 1:
                raise InvalidInputError(
                    "several adapters are active (stacked); stacked adapters are not served per row"
                )
            return registry.get(refs[0]).ref if refs else None
        v = registry.get(model)
        if v.base != server.base_key:
            raise NotFoundError(f"{model} is an adapter of base {v.base}, not of {server.base_key}")
        return v.ref

    async def parse(request: Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInputError("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise InvalidInputError("the request body must be a JSON object")
        return body

    async def run(body: dict, prompt: str, chat: bool):
        adapter = resolve(body.get("model"))
        p = parse_params(body)
        ids = server.tokenizer(prompt, add_special_tokens=not chat).input_ids
        if context and len(ids) + p.max_tokens > context:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens; with max_tokens={p.max_tokens} it exceeds the context of {context}"
            )
        job = Job(ids, adapter, p.max_tokens, p.sampling, asyncio.get_running_loop())
        batcher.submit(job)
        reply = Reply(
            f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            body["model"],
            chat,
            len(ids),
        )
        if p.stream:
            return StreamingResponse(stream(job, p, reply), media_type="text/event-stream")
        text, reason = "", "stop"
        try:
            async for piece, end in pieces(job, p):
                text += piece
                reason = end or reason
        finally:
            job.cancelled = True  # nothing more is read: the batch stops generating this row
        return reply.whole(text, reason, job.tokens)

    async def pieces(job: Job, p: RequestParams):
        """The completion's text as it comes: (new text, None) pairs, then (the rest, finish reason).

        Text that could be the beginning of a stop string is held back until it is not; a
        stop string ends the completion (it is not part of the text) and its row in the batch.
        A whole answer with no stop strings is decoded once, at the end.
        """
        tokens: list[int] = []
        sent = 0
        while True:
            kind, value = await job.out.get()
            if kind == "error":
                raise value
            if kind == "end":
                text = server.tokenizer.decode(tokens, skip_special_tokens=True)
                cut = find_stop(text, p.stop)
                yield (text[sent:], value) if cut is None else (text[sent:cut], "stop")
                return
            tokens.append(value)
            job.tokens = len(tokens)
            if not (p.stream or p.stop):
                continue
            text = server.tokenizer.decode(tokens, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                continue
            cut = find_stop(text, p.stop)
            if cut is not None:
                job.cancelled = True
                yield text[sent:cut], "stop"
                return
            upto = len(text) - held_back(text, p.stop)
            if upto > sent:
                yield text[sent:upto], None
                sent = upto

    async def stream(job: Job, p: RequestParams, reply: Reply):
        try:
            if reply.chat:
                yield reply.chunk({"role": "assistant"}, None)
            async for piece, reason in pieces(job, p):
                if piece:
                    yield reply.chunk(piece, None)
                if reason:
                    yield reply.chunk(None, reason)
            if p.include_usage:
                yield reply.usage_chunk(job.tokens)
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: the error goes in the stream
            error = {"message": str(e), "type": "server_error"}
            yield "data: " + json.dumps({"error": error}) + "\n\n"
        finally:
            job.cancelled = True  # a client that went away stops its row; the batch goes on

    def guarded(handler):
        async def wrapper(request: Request):
            try:
                body = await parse(request)
                return await handler(request, body)
            except NotFoundError as e:
                return _error(404, str(e), "model", "model_not_found")
            except AdaptrError as e:
                return _error(400, str(e), getattr(e, "param", None))
            except Exception as e:  # a bug or a failed batch: an OpenAI-shaped 500, logged
                log.exception("request failed")
                return _error(500, f"generation failed: {e}")

        return wrapper

    async def completions(request: Request, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidInputError("'prompt' must be a string (one prompt per request)")
        return await run(body, prompt, chat=False)

    async def chat_completions(request: Request, body: dict):
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)
        ):
            raise InvalidInputError("'messages' must be a non-empty list of {role, content}")
        try:
            prompt = server.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as e:
            raise InvalidInputError(f"cannot apply the chat template: {e}") from None
        return await run(body, prompt, chat=True)

    app.add_api_route("/v1/completions", guarded(completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])
    return app
