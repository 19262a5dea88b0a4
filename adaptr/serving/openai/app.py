"""An OpenAI-compatible HTTP server over :class:`AdapterServer`.

``model`` names an adapter ref (``NAME``, ``NAME@N``, ``NAME@tag``), the base (no adapter)
or ``active`` (the base's active adapter from ``adaptr switch``). Refs are resolved on
every request, so a switch or a new version is served without a restart. Concurrent
requests are batched together across adapters by one worker thread, the
:class:`~adaptr.serving.scheduler.Scheduler` the app starts and stops with its lifespan
(continuous batching: a request joins the running batch at the next decoding step and
leaves it the step it finishes); streaming (SSE) follows each row token by token.

One request cannot hold up the others: the body is bounded (413 past
:attr:`Limits.max_body_bytes`, 408 when it does not arrive within
:attr:`Limits.body_timeout_s`), a prompt longer than the context is refused (400) before it
is tokenized when its length in characters already says so, and the JSON parsing, the chat
template and the tokenizing run on worker threads, never on the event loop. A request whose
client went away is cancelled: dropped before it starts, or its row leaves the batch. With an
API key every ``/v1`` route needs ``Authorization: Bearer KEY``. Every error is
OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), 4xx for the client's
mistakes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError
from adaptr.inference import context_window
from adaptr.serving.openai import logprobs as logprob_shapes
from adaptr.serving.openai.batcher import Batcher, Job
from adaptr.serving.openai.http import error_body, uvicorn_settings
from adaptr.serving.openai.logprobs import TokenTexts
from adaptr.serving.openai.protocol import ParamError, RequestParams, parse_params
from adaptr.serving.scheduler import Sampling
from adaptr.serving.server import AdapterServer

__all__ = ["Batcher", "Job", "Limits", "create_app", "serve_in_thread"]

log = logging.getLogger(__name__)

STOP_S = 60  # how long an app's shutdown waits for the batch being generated to end
MAX_CHOICES = 128  # prompts x n in one request


@dataclass
class Limits:
    """What one request may take; read on every request (a live app's limits may change)."""

    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0  # for the whole body to arrive once the headers have


class _HTTPError(Exception):
    """A refusal with its own status (413, 408...)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def _error(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = error_body(status, message, param, code)
    return Response(body, status, headers, media_type="application/json")


class _APIKey:
    """ASGI middleware: every ``/v1`` route needs ``Authorization: Bearer KEY``."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == "/v1" or path.startswith("/v1/")):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                message = "invalid or missing API key: send 'Authorization: Bearer KEY' with the key adaptr serve was given"  # fmt: skip
                response = _error(401, message, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})  # fmt: skip
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class Reply:
    """The OpenAI-shaped answers to one request (its choices): whole, or as SSE chunks."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int
    finished: bool = False  # the whole stream went out

    def _body(self, choices: list, **extra: Any) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def choice(self, index: int, text: str, reason: str, logprobs: dict | None) -> dict:
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return choice

    def whole(self, choices: list[dict], completion_tokens: int) -> dict:
        return self._body(choices, usage=self.usage(completion_tokens))

    def _sse(self, body: dict) -> str:
        if self.chat:
            body["object"] = "chat.completion.chunk"
        return "data: " + json.dumps(body) + "\n\n"

    def chunk(
        self, index: int, delta: str | dict | None, reason: str | None, logprobs: dict | None = None
    ) -> str:
        """One SSE event of choice ``index``: new text (or the chat's opening role), or the
        finish reason; with the log-probabilities of the tokens it covers."""
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = (
                delta if isinstance(delta, dict) else {"content": delta} if delta else {}
            )
        else:
            choice["text"] = delta or ""
        return self._sse(self._body([choice]))

    def usage_chunk(self, completion_tokens: int) -> str:
        """The last event when ``stream_options.include_usage``: no choices, the usage."""
        return self._sse(self._body([], usage=self.usage(completion_tokens)))


class _JobStream(StreamingResponse):
    """The SSE answer of one request: however it ends (its end, the client gone), its jobs'
    rows stop, and a client that went away is logged in one line."""

    def __init__(self, content, jobs: list[Job], reply: Reply):
        super().__init__(content, media_type="text/event-stream")
        self.jobs, self.reply = jobs, reply

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            for job in self.jobs:
                job.cancel()
            if not self.reply.finished:
                log.info("%s: the client disconnected; its stream is stopped", self.reply.id)


@dataclass
class _Prompt:
    text: str  # as sent, or the token ids decoded (what ``echo`` repeats)
    ids: list[int]


@dataclass
class _Prepared:
    model: str
    adapter: str | None
    params: RequestParams
    prompts: list[_Prompt]


def _loads(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidInputError("the request body is nested too deeply") from None
    except ValueError:  # not JSON, not UTF-8, an integer of too many digits
        raise InvalidInputError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return body


def _text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(param, f"'{param}' is not valid Unicode (a lone surrogate)") from None
    return value


def _prompts(prompt: Any) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each a string or token ids (OpenAI's four forms)."""
    bad = ParamError(
        "prompt",
        "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids",  # fmt: skip
    )

    def ids(value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in value
        )

    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p) for p in prompt):
        prompts = prompt
    else:
        raise bad
    if len(prompts) > MAX_CHOICES:
        raise ParamError("prompt", f"at most {MAX_CHOICES} prompts per request")
    for p in prompts:
        if not p:
            raise ParamError(
                "prompt", "'prompt' is empty" if len(prompts) == 1 else "a prompt is empty"
            )
        if isinstance(p, str):
            _text(p, "prompt")
    return prompts


TOOLS_NOT_YET = (
    "tool calls in messages are not supported yet: adaptr serve has no tools path ('tools' is "
    "refused); send a tool's result as the text of a user message"
)
NOT_TEXT = "content parts are not supported: adaptr serves text models; send {'type': 'text', 'text': ...} parts"  # fmt: skip
# part types that are not text, by what they hold
_MEDIA = {"image_url": "image", "image": "image", "input_image": "image", "input_audio": "audio",
          "audio_url": "audio", "audio": "audio", "video_url": "video", "file": "file",
          "input_file": "file"}  # fmt: skip
# what the openai client sends back with an answer's message (model_dump()): null or empty
# they carry nothing; anything else in them is refused, never dropped
_EMPTY = {"tool_calls": (None, []), "function_call": (None,), "tool_call_id": (None,),
          "refusal": (None,), "audio": (None,), "annotations": (None, [])}  # fmt: skip


def _content(content: Any, where: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines (as vLLM)."""
    if isinstance(content, str):
        return _text(content, "messages")
    if not isinstance(content, list):
        raise ParamError("messages", f"{where}: 'content' must be a string or a list of text parts")  # fmt: skip
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA:
            raise ParamError("messages", f"{where}: {_MEDIA[kind]} {NOT_TEXT}")
        if kind == "refusal":
            raise ParamError("messages", f"{where}: refusal content parts are not supported; send the assistant's text as a text part")  # fmt: skip
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:  # fmt: skip
            raise ParamError("messages", f"{where}: a content part must be {{'type': 'text', 'text': a string}} and nothing else")  # fmt: skip
        texts.append(_text(part["text"], "messages"))
    return "\n".join(texts)


def _messages(messages: Any) -> list[dict]:
    """``messages`` as the chat template takes them: role, text content (a list of text
    parts is joined) and ``name`` when given (a key of the message, as vLLM passes it)."""
    if not isinstance(messages, list) or not messages:
        raise ParamError(
            "messages",
            "'messages' must be a non-empty list of {role, content}, content a string or a list of text parts",  # fmt: skip
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ParamError("messages", f"{where} must be an object with a string 'role' and a 'content'")  # fmt: skip
        if m["role"] in ("tool", "function"):
            raise ParamError("messages", f"{where}: {TOOLS_NOT_YET}")
        for key, value in m.items():
            if key in ("role", "content", "name") or (key in _EMPTY and value in _EMPTY[key]):
                continue
            if key in ("tool_calls", "function_call", "tool_call_id"):
                raise ParamError("messages", f"{where}: '{key}': {TOOLS_NOT_YET}")
            if key == "audio":
                raise ParamError("messages", f"{where}: 'audio' is not supported: adaptr serves text models")  # fmt: skip
            shown = key[:60] if isinstance(key, str) else repr(key)
            raise ParamError(
                "messages",
                f"{where}: '{shown}' is not a message field adaptr serve takes (role, content, name)",  # fmt: skip
            )
        message = {"role": _text(m["role"], "messages"), "content": _content(m.get("content"), where)}  # fmt: skip
        if m.get("name") is not None:
            if not isinstance(m["name"], str) or not m["name"]:
                raise ParamError("messages", f"{where}: 'name' must be a non-empty string")
            message["name"] = _text(m["name"], "messages")
        out.append(message)
    return out


def create_app(server: AdapterServer, *, api_key: str | None = None, limits: Limits | None = None):
    """The FastAPI app serving ``server`` (see the module docstring)."""
    if api_key is not None and not api_key:
        raise InvalidInputError("the API key is empty: give a non-empty key, or none")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        """The app's threads live while it serves: the batch worker, and the workers that
        parse, template and tokenize off the event loop."""
        app.state.batcher = Batcher(server)
        app.state.workers = ThreadPoolExecutor(2, thread_name_prefix="adaptr-prepare")
        try:
            yield
        finally:
            await asyncio.to_thread(stop, app.state.batcher, app.state.workers)

    def stop(batcher: Batcher, workers: ThreadPoolExecutor) -> None:
        workers.shutdown(wait=True, cancel_futures=True)
        if not batcher.close(STOP_S):
            log.warning("the batch worker did not end within %d s of the shutdown", STOP_S)

    # no /docs, /redoc, /openapi.json: they would describe the server to anyone, key or not
    app = FastAPI(
        title="adaptr", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url=None,
    )  # fmt: skip
    if api_key:
        app.add_middleware(_APIKey, key=api_key)
    app.state.limits = limits or Limits()
    registry = server.registry
    context = context_window(server.model.config)  # None: RoPE scaling leaves it unbounded
    # no token covers more characters than the longest in the vocabulary (tokenizers do not
    # drop characters), so a prompt past context * longest characters cannot fit
    longest = max(map(len, server.tokenizer.get_vocab()), default=1)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(app.state.workers, fn, *args)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):  # noqa: ANN001
        return _error(400, f"invalid request: {exc.errors()[0].get('msg', exc)}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):  # noqa: ANN001 (an unknown route, a wrong method)
        message = str(exc.detail)
        if exc.status_code in (404, 405):
            message = (
                f"{message}: {request.method} {request.url.path[:200]} is not a route of adaptr "
                "serve (GET /v1/models, GET /v1/models/ID, POST /v1/completions, "
                "POST /v1/chat/completions)"
            )
        return _error(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # noqa: ANN001 (uvicorn logs it: the handler re-raises)
        return _error(500, "internal error: the server's log has the details")

    def model_ids() -> list[str]:
        ids = [server.base_key]
        for v in registry.list():
            if v.base == server.base_key:
                ids += [v.name, v.ref] + [f"{v.name}@{t}" for t in v.tags]
        return list(dict.fromkeys(ids))

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        data = [
            {"id": i, "object": "model", "created": now, "owned_by": "adaptr"}
            # not on the workers: slow tokenizing there must not hold up the listing
            for i in await asyncio.to_thread(model_ids)
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        try:
            await asyncio.to_thread(resolve, model_id)
        except NotFoundError as e:
            return _error(404, str(e), "model", "model_not_found")
        except AdaptrError:  # not a ref at all
            return _error(404, str(unknown(model_id)), "model", "model_not_found")
        return {
            "id": model_id,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "adaptr",
        }

    def unknown(model: str) -> NotFoundError:
        return NotFoundError(
            f"the model {model[:100]!r} does not exist: name an adapter of base "
            f"{server.base_key} (NAME, NAME@VERSION, NAME@TAG; GET /v1/models lists them), "
            f"{server.base_key!r} or 'active'"
        )

    def resolve(model: Any) -> str | None:
        if not isinstance(model, str) or not model:
            raise ParamError("model", "'model' must name an adapter, the base, or 'active'")
        if model == server.base_key:
            return None
        if model == "active":
            refs = registry.active(server.base_key).get(server.base_key, [])
            if len(refs) > 1:
                raise ParamError(
                    "model",
                    "several adapters are active (stacked); stacked adapters are not served per row",
                )
            return registry.get(refs[0]).ref if refs else None
        try:
            v = registry.get(model)
        except InvalidInputError:  # not a ref (Ref.parse: ASCII digits, int64 versions, ...)
            raise unknown(model) from None
        if v.base != server.base_key:
            raise NotFoundError(f"{model} is an adapter of base {v.base}, not of {server.base_key}")
        return v.ref

    vocab = server.model.get_input_embeddings().weight.shape[0]

    def prepare(raw: bytes, chat: bool) -> _Prepared:
        """The request's body checked, resolved and tokenized (on a worker thread)."""
        body = _loads(raw)
        adapter = resolve(body.get("model"))
        p = parse_params(body, chat)
        if chat:
            param, messages = "messages", _messages(body.get("messages"))
            try:
                template = server.chat_template(adapter)  # the one this adapter trained with
            except InvalidInputError as e:
                raise ParamError("messages", str(e)) from None
            try:
                text = server.tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            except Exception as e:
                raise ParamError("messages", f"cannot apply the chat template: {e}") from None
            prompts: list[str | list[int]] = [text]
        else:
            param, prompts = "prompt", _prompts(body.get("prompt"))
        if len(prompts) * p.n > MAX_CHOICES:
            raise ParamError("n", f"prompts x n must be at most {MAX_CHOICES}")
        return _Prepared(body["model"], adapter, p, [tokens(x, chat, param, p) for x in prompts])

    def tokens(prompt: str | list[int], chat: bool, param: str, p: RequestParams) -> _Prompt:
        """One prompt as token ids, checked against the vocabulary and the context."""
        code = "context_length_exceeded"
        if isinstance(prompt, str):
            if context and len(prompt) > context * longest:
                raise ParamError(
                    param,
                    f"the prompt ({len(prompt)} characters) exceeds the context of {context} tokens",
                    code,
                )
            text, ids = prompt, server.tokenizer(prompt, add_special_tokens=not chat).input_ids
        else:
            if not all(0 <= t < vocab for t in prompt):
                raise ParamError(param, f"a token id is outside the vocabulary (0 to {vocab - 1})")
            text, ids = server.tokenizer.decode(prompt, skip_special_tokens=True), prompt
        if context and len(ids) + p.max_tokens > context:
            raise ParamError(
                param if len(ids) >= context else "max_tokens",
                f"the prompt has {len(ids)} tokens; with max_tokens={p.max_tokens} it exceeds the context of {context}",
                code,
            )
        return _Prompt(text, ids)

    async def read_body(request: Request) -> bytes:
        limits: Limits = app.state.limits
        too_large = _HTTPError(
            413,
            f"the request body is larger than {limits.max_body_bytes} bytes "
            "(adaptr serve --max-body-mb sets the limit)",
            "request_too_large",
        )
        declared = request.headers.get("content-length", "")
        if (
            declared.isascii()
            and declared.isdigit()
            and (len(declared) > 15 or int(declared) > limits.max_body_bytes)
        ):
            raise too_large  # at once, before the body
        chunks: list[bytes] = []
        size = 0

        async def read() -> None:
            nonlocal size
            async for chunk in request.stream():
                size += len(chunk)
                if size > limits.max_body_bytes:
                    raise too_large
                chunks.append(chunk)

        try:
            await asyncio.wait_for(read(), limits.body_timeout_s)
        except asyncio.TimeoutError:
            raise _HTTPError(
                408, f"the request body did not arrive within {limits.body_timeout_s:g} s"
            ) from None
        return b"".join(chunks)

    async def disconnected(request: Request) -> None:
        """Returns once the client has gone away."""
        while (await request.receive())["type"] != "http.disconnect":
            await asyncio.sleep(0.05)  # not expected once the body is read; no busy loop

    texts = TokenTexts(server.tokenizer)

    def logprobs(job: Job, upto: int, since: int = 0, prompt: _Prompt | None = None) -> dict | None:
        """Choice ``job``'s log-probabilities of its tokens ``since:upto`` (with ``prompt``, its
        prompt's first: echo), in its endpoint's shape; text offsets continue from the last call."""
        if job.logprobs is None:
            return None
        entries: list = job.token_logprobs[since:upto]
        if job.chat:
            return logprob_shapes.chat(entries, texts, job.as_ids)
        ids = [e.token for e in entries]
        if prompt is not None:  # (scored once per prompt: by its first choice, prefilled by now)
            scored = (job.scorer or job).prompt_token_logprobs or [None] * len(prompt.ids)
            ids, entries = prompt.ids + ids, list(scored) + entries
        out = logprob_shapes.completion(ids, entries, texts, job.text_offset, job.as_ids)
        job.text_offset += sum(len(texts.text(t)) for t in ids)
        return out

    async def events(jobs: list[Job]):
        """The jobs' events as they come, ``(job, kind, value, entries)``, until every job ended."""
        out = jobs[0].out
        running = len(jobs)
        while running:
            index, kind, value, entries = await out.get()
            if kind == "error":
                raise value
            running -= kind == "end"
            yield jobs[index], kind, value, entries

    async def whole(request: Request, jobs: list[Job], req: _Prepared, reply: Reply) -> Response:
        async def collect() -> tuple[dict[int, str], dict[int, str]]:
            text = {job.index: "" for job in jobs}
            reasons: dict[int, str] = {}
            async for job, kind, value, _ in events(jobs):
                if kind == "text":
                    text[job.index] += value
                else:
                    reasons[job.index] = value
            return text, reasons

        def body(text: dict[int, str], reasons: dict[int, str]) -> str:
            """The answer's JSON (off the loop: log-probabilities can make it megabytes)."""
            choices = []
            for job in jobs:
                echo = req.prompts[job.prompt_index] if req.params.echo else None
                lp = logprobs(job, len(job.token_logprobs), 0, echo)
                full = (echo.text if echo else "") + text[job.index]
                choices.append(reply.choice(job.index, full, reasons[job.index], lp))
            return json.dumps(reply.whole(choices, sum(job.completion_tokens for job in jobs)))

        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(disconnected(request))
        gone.add_done_callback(lambda t: t.cancelled() or t.exception())  # (retrieved)
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for job in jobs:
                job.cancel()  # nothing more is read: its row leaves, or it never starts
            gone.cancel()
            answered = work.done()
            if not answered:
                work.cancel()
        if not answered:
            log.info("%s: the client disconnected; its request is cancelled", reply.id)
            return _error(400, "the client disconnected")  # nobody reads it
        return Response(await off_loop(body, *work.result()), media_type="application/json")

    async def stream(jobs: list[Job], req: _Prepared, reply: Reply):
        """SSE chunks of every choice as its text comes (the scheduler decodes incrementally
        and holds back text that could begin a stop string; a stop string ends the choice's
        row and is not part of its text), each with the log-probabilities of its tokens."""
        p = req.params
        covered = {job.index: 0 for job in jobs}  # token log-probabilities sent so far
        echoed: set[int] = set()
        try:
            for job in jobs:
                if reply.chat:
                    yield reply.chunk(job.index, {"role": "assistant"}, None)
            async for job, kind, value, entries in events(jobs):
                if p.echo and job.index not in echoed:  # its prompt is scored by now (prefill)
                    echoed.add(job.index)
                    prompt = req.prompts[job.prompt_index]
                    yield reply.chunk(job.index, prompt.text, None, logprobs(job, 0, 0, prompt))
                if kind == "text":
                    yield reply.chunk(job.index, value, None, logprobs(job, entries, covered[job.index]))  # fmt: skip
                else:
                    rest = logprobs(job, entries, covered[job.index])
                    if rest is not None and not any(rest.values()):
                        rest = None
                    yield reply.chunk(job.index, None, value, rest)
                covered[job.index] = entries
            if p.include_usage:
                yield reply.usage_chunk(sum(job.completion_tokens for job in jobs))
            yield "data: [DONE]\n\n"
        except Exception as e:  # headers are sent: the error goes in the stream
            log.exception("request %s failed while streaming", reply.id)
            yield "data: " + error_body(500, f"generation failed: {e}").decode() + "\n\n"
        reply.finished = True

    def jobs_of(req: _Prepared, chat: bool) -> list[Job]:
        """One job per choice: each prompt ``n`` times (choice j's seed: ``seed + j``)."""
        p = req.params
        _, temperature, top_p = p.sampling
        loop, out = asyncio.get_running_loop(), asyncio.Queue()
        jobs: list[Job] = []
        for i, prompt in enumerate(req.prompts):
            scorer = None  # the choice that scores the prompt for all its choices (echo)
            for j in range(p.n):
                seed = None if p.seed is None else (p.seed + j) % 2**63
                job = Job(prompt.ids, req.adapter, p.max_tokens, Sampling(temperature, top_p, seed),
                          p.stop, logprobs=p.logprobs,
                          prompt_logprobs=p.echo and p.logprobs is not None and scorer is None,
                          ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, as_ids=p.as_ids,
                          loop=loop, out=out, index=len(jobs), prompt_index=i, chat=chat)  # fmt: skip
                job.scorer, scorer = scorer, scorer or job
                jobs.append(job)
        return jobs

    async def handle(request: Request, chat: bool) -> Response:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        try:
            req = await off_loop(prepare, await read_body(request), chat)
            jobs = jobs_of(req, chat)
            for job in jobs:
                app.state.batcher.submit(job)
            reply = Reply(rid, req.model, chat, sum(len(p.ids) for p in req.prompts))
            if req.params.stream:
                return _JobStream(stream(jobs, req, reply), jobs, reply)
            return await whole(request, jobs, req, reply)
        except ClientDisconnect:
            log.info("%s: the client disconnected before its request was read", rid)
            return _error(400, "the client disconnected")  # nobody reads it
        except _HTTPError as e:
            return _error(e.status, str(e), None, e.code, {"Connection": "close"})
        except NotFoundError as e:
            return _error(404, str(e), getattr(e, "param", "model"), "model_not_found")
        except AdaptrError as e:
            return _error(400, str(e), getattr(e, "param", None), getattr(e, "code", None))
        except Exception as e:  # a bug or a failed batch: an OpenAI-shaped 500, logged
            log.exception("request %s failed", rid)
            return _error(500, f"generation failed: {e}")

    async def completions(request: Request):
        return await handle(request, chat=False)

    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app


@contextmanager
def serve_in_thread(
    app,
    *,
    host: str = "127.0.0.1",
    start_timeout_s: float = 120.0,
    stop_timeout_s: float = 60.0,
    **uvicorn_config: Any,
) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread; yields its ``/v1`` URL, stops it on exit.

    The socket is bound (and listening) here, on a port the system chooses, and handed to
    uvicorn: no other process can take the port between choosing it and serving on it.
    ``uvicorn_config`` goes to ``uvicorn.Config`` over adaptr serve's settings
    (:func:`~adaptr.serving.openai.http.uvicorn_settings`; ``log_level`` is ``"warning"``
    unless given). Raises RuntimeError when the server has not started within ``start_timeout_s``
    or its thread ended while starting, and when it has not stopped within
    ``stop_timeout_s`` of the block's end.
    """
    import uvicorn

    uvicorn_config = uvicorn_settings(**{"log_level": "warning", **uvicorn_config})
    ipv6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, **uvicorn_config))
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn"
        )
        thread.start()
    except BaseException:
        sock.close()
        raise
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the HTTP server failed to start (see the log above)")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start within {start_timeout_s:g} s")
            time.sleep(0.02)
        yield f"http://{f'[{host}]' if ipv6 else host}:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=stop_timeout_s)
        sock.close()
    if thread.is_alive():
        raise RuntimeError(f"the HTTP server did not stop within {stop_timeout_s:g} s")
