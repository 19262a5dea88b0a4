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
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from .errors import AdaptrError, InvalidInputError, NotFoundError
from .serving import AdapterServer

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
    cancelled: bool = False

    def emit(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


class _BatchStreamer:
    """A transformers streamer that hands each row's new token to its job."""

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

    def end(self) -> None:
        for i, job in enumerate(self.jobs):
            if not self.done[i]:
                self.done[i] = True
                job.emit(("end", "stop"))


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
        s = self.server
        try:
            do_sample, temperature, top_p = sampling
            kwargs = {"do_sample": do_sample, "max_new_tokens": max(j.max_tokens for j in jobs)}
            if do_sample:
                kwargs.update(temperature=temperature, top_p=top_p)
            adapters = [j.adapter for j in jobs]
            self.most_rows = max(self.most_rows, len(jobs))
            self.most_models = max(self.most_models, len(set(adapters)))  # the base (None) too
            with s.batch(adapters, len(jobs), grouped=True) as order:
                jobs = [jobs[i] for i in order]  # each adapter's rows together
                streamer = _BatchStreamer(jobs, s.tokenizer.eos_token_id)
                # left padding (the server's tokenizer is set up for it)
                ids = {"input_ids": [j.prompt_ids for j in jobs]}
                enc = s.tokenizer.pad(ids, return_tensors="pt")
                s.model.generate(
                    **enc, pad_token_id=s.tokenizer.pad_token_id, streamer=streamer, **kwargs
                )
            streamer.end()
        except Exception as e:  # reported to every waiting request; the worker keeps serving
            for j in jobs:
                j.emit(("error", e))


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

    def params(body: dict) -> tuple[int, tuple]:
        max_tokens = body.get("max_tokens", body.get("max_completion_tokens", 16))
        if (
            not isinstance(max_tokens, int)
            or isinstance(max_tokens, bool)
            or not 1 <= max_tokens <= 4096
        ):
            raise InvalidInputError("'max_tokens' must be an integer between 1 and 4096")
        temperature = body.get("temperature", 0) or 0
        top_p = body.get("top_p", 1) or 1
        if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise InvalidInputError("'temperature' must be a number between 0 and 2")
        return max_tokens, (temperature > 0, float(temperature), float(top_p))

    async def run(request: Request, body: dict, prompt: str, chat: bool):
        adapter = resolve(body.get("model"))
        max_tokens, sampling = params(body)
        ids = server.tokenizer(prompt, add_special_tokens=not chat).input_ids
        if context and len(ids) + max_tokens > context:
            raise InvalidInputError(
                f"the prompt has {len(ids)} tokens; with max_tokens={max_tokens} it exceeds the context of {context}"
            )
        job = Job(ids, adapter, max_tokens, sampling, asyncio.get_running_loop())
        batcher.submit(job)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        model = body["model"]
        if body.get("stream"):
            return StreamingResponse(
                stream(request, job, rid, model, chat), media_type="text/event-stream"
            )
        tokens, reason = [], "stop"
        while True:
            kind, value = await job.out.get()
            if kind == "token":
                tokens.append(value)
            elif kind == "error":
                raise value
            else:
                reason = value
                break
        text = server.tokenizer.decode(tokens, skip_special_tokens=True)
        usage = {
            "prompt_tokens": len(ids),
            "completion_tokens": len(tokens),
            "total_tokens": len(ids) + len(tokens),
        }
        choice = {"index": 0, "finish_reason": reason}
        choice.update(
            {"message": {"role": "assistant", "content": text}}
            if chat
            else {"text": text, "logprobs": None}
        )
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice], "usage": usage}  # fmt: skip

    async def stream(request: Request, job: Job, rid: str, model: str, chat: bool):
        tokens: list[int] = []
        sent = ""
        kind_name = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason}
            if chat:
                choice["delta"] = {"content": delta} if delta is not None else {}
            else:
                choice.update(text=delta or "", logprobs=None)
            return (
                "data: "
                + json.dumps(
                    {
                        "id": rid,
                        "object": kind_name,
                        "created": int(time.time()),
                        "model": model,
                        "choices": [choice],
                    }
                )
                + "\n\n"
            )

        try:
            if chat:
                yield "data: " + json.dumps({"id": rid, "object": kind_name, "created": int(time.time()), "model": model,
                                             "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}) + "\n\n"  # fmt: skip
            while True:
                kind, value = await job.out.get()
                if kind == "token":
                    tokens.append(value)
                    text = server.tokenizer.decode(tokens, skip_special_tokens=True)
                    if text.endswith("\ufffd"):  # an incomplete UTF-8 character: wait for the rest
                        continue
                    delta, sent = text[len(sent) :], text
                    if delta:
                        yield chunk(delta, None)
                elif kind == "error":
                    yield (
                        "data: "
                        + json.dumps({"error": {"message": str(value), "type": "server_error"}})
                        + "\n\n"
                    )
                    return
                else:
                    yield chunk(None, value)
                    yield "data: [DONE]\n\n"
                    return
        finally:
            job.cancelled = True  # a client that went away stops receiving; the batch goes on

    def guarded(handler):
        async def wrapper(request: Request):
            try:
                body = await parse(request)
                return await handler(request, body)
            except NotFoundError as e:
                return _error(404, str(e), "model", "model_not_found")
            except AdaptrError as e:
                return _error(400, str(e))

        return wrapper

    async def completions(request: Request, body: dict):
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InvalidInputError("'prompt' must be a string (one prompt per request)")
        return await run(request, body, prompt, chat=False)

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
        return await run(request, body, prompt, chat=True)

    app.add_api_route("/v1/completions", guarded(completions), methods=["POST"])
    app.add_api_route("/v1/chat/completions", guarded(chat_completions), methods=["POST"])
    return app
