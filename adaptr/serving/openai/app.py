"""An OpenAI-compatible HTTP server over :class:`AdapterServer`.

``model`` names an adapter ref (``NAME``, ``NAME@N``, ``NAME@tag``), the base (no adapter)
or ``active`` (the base's active adapter from ``adaptr switch``). Refs are resolved on
every request, so a switch or a new version is served without a restart. Concurrent
requests are batched together across adapters by the server's one
:class:`~adaptr.serving.scheduler.Scheduler` (the one :meth:`AdapterServer.generate` uses;
the app closes it with its lifespan; a later use starts it again): continuous batching, a
request joins the running batch at the next decoding step and leaves it the step it
finishes; streaming (SSE) follows each row token by token.

One request cannot hold up the others: the body is bounded (413 past
:attr:`Limits.max_body_bytes`, 408 when it does not arrive within
:attr:`Limits.body_timeout_s`), a prompt longer than the context is refused (400) before it
is tokenized when its length in characters already says so, and the JSON parsing, the chat
template and the tokenizing run on worker threads, never on the event loop. A request whose
client went away is cancelled: dropped before it starts, or its row leaves the batch. With an
API key every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer KEY``. The operator's
routes (``/health``, ``/metrics``, ``/v1/adapters``, vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``) are :mod:`~adaptr.serving.openai.operations`'. Every error is
OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``), 4xx for the client's
mistakes.

The parts: :mod:`~adaptr.serving.openai.prepare` (a body made into scheduler requests),
:mod:`~adaptr.serving.openai.responses` (JSON and SSE answers), :mod:`.errors`, :mod:`.auth`,
:mod:`.context` (the state the handlers share, ``app.state.context``) and :mod:`.http` (the
guarded uvicorn protocol).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from adaptr.errors import AdaptrError, InvalidInputError, NotFoundError
from adaptr.serving.openai import operations, responses
from adaptr.serving.openai.auth import APIKey
from adaptr.serving.openai.context import AppContext, Limits, context_of, read_body
from adaptr.serving.openai.errors import HTTPRefusal, add_error_handlers, error_response
from adaptr.serving.openai.http import uvicorn_server
from adaptr.serving.openai.prepare import jobs_for, model_ids, prepare, resolve, unknown_model
from adaptr.serving.server import AdapterServer

__all__ = ["AppContext", "Limits", "create_app", "serve_in_thread"]

log = logging.getLogger(__name__)

STOP_S = 60  # how long an app's shutdown waits for the batch being generated to end


def create_app(
    server: AdapterServer, *, api_key: str | None = None, limits: Limits | None = None
) -> FastAPI:
    """The FastAPI app serving ``server`` (see the module docstring)."""
    if api_key is not None and not api_key:
        raise InvalidInputError("the API key is empty: give a non-empty key, or none")
    # no /docs, /redoc, /openapi.json: they would describe the server to anyone, key or not
    app = FastAPI(
        title="adaptr", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
        openapi_url=None,
    )  # fmt: skip
    if api_key:
        app.add_middleware(APIKey, key=api_key)
    app.state.context = AppContext.of(server, limits or Limits())
    add_error_handlers(app)
    for path, route, method in ROUTES + operations.ROUTES:
        app.add_api_route(path, route, methods=[method], response_model=None)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The app's threads live while it serves: the server's scheduler (its batch worker),
    and the workers that parse, template and tokenize off the event loop."""
    ctx: AppContext = app.state.context
    ctx.scheduler = ctx.server.scheduler
    ctx.workers = ThreadPoolExecutor(2, thread_name_prefix="adaptr-prepare")
    try:
        yield
    finally:
        ctx.stopping = True  # GET /health: 503 from here on
        await asyncio.to_thread(_stop, ctx)


def _stop(ctx: AppContext) -> None:
    ctx.workers.shutdown(wait=True, cancel_futures=True)
    if not ctx.scheduler.close(STOP_S):
        log.warning("the batch worker did not end within %d s of the shutdown", STOP_S)


# ------------------------------------------------------------------ routes
async def list_models(request: Request) -> dict:
    ctx = context_of(request)
    now = int(time.time())
    data = [
        {"id": i, "object": "model", "created": now, "owned_by": "adaptr"}
        # not on the workers: slow tokenizing there must not hold up the listing
        for i in await asyncio.to_thread(model_ids, ctx)
    ]
    return {"object": "list", "data": data}


async def get_model(request: Request, model_id: str) -> dict | Response:
    ctx = context_of(request)
    try:
        await asyncio.to_thread(resolve, ctx, model_id)
    except NotFoundError as e:
        return error_response(404, str(e), "model", "model_not_found")
    except AdaptrError:  # not a ref at all
        return error_response(404, str(unknown_model(ctx, model_id)), "model", "model_not_found")
    return {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "adaptr"}


async def completions(request: Request) -> Response:
    return await answer(request, chat=False)


async def chat_completions(request: Request) -> Response:
    return await answer(request, chat=True)


async def answer(request: Request, chat: bool) -> Response:
    """A completion request: read, prepared on a worker, its jobs submitted to the scheduler;
    the whole answer or its stream. Every failure is an OpenAI-shaped error."""
    ctx = context_of(request)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    try:
        req = await ctx.off_loop(prepare, ctx, await read_body(request, ctx.limits), chat)
        jobs = jobs_for(req, chat)
        ctx.server.enqueue(jobs)
        reply = responses.Reply(rid, req.model, chat, sum(len(p.ids) for p in req.prompts))
        if req.params.stream:
            return responses.JobStream(responses.stream(ctx, jobs, req, reply), jobs, reply)
        return await responses.whole(ctx, request, jobs, req, reply)
    except ClientDisconnect:
        log.info("%s: the client disconnected before its request was read", rid)
        return error_response(400, "the client disconnected")  # nobody reads it
    except HTTPRefusal as e:
        return error_response(e.status, str(e), None, e.code, {"Connection": "close"})
    except NotFoundError as e:
        return error_response(404, str(e), getattr(e, "param", "model"), "model_not_found")
    except AdaptrError as e:
        return error_response(400, str(e), getattr(e, "param", None), getattr(e, "code", None))
    except Exception as e:  # a bug or a failed batch: an OpenAI-shaped 500, logged
        log.exception("request %s failed", rid)
        return error_response(500, f"generation failed: {e}")


ROUTES = [
    ("/v1/models", list_models, "GET"),
    ("/v1/models/{model_id:path}", get_model, "GET"),
    ("/v1/completions", completions, "POST"),
    ("/v1/chat/completions", chat_completions, "POST"),
]


# ------------------------------------------------------------ in a thread
@contextmanager
def serve_in_thread(
    app: FastAPI,
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
    (:func:`~adaptr.serving.openai.http.uvicorn_server`; ``log_level`` is ``"warning"``
    unless given). Raises RuntimeError when the server has not started within ``start_timeout_s``
    or its thread ended while starting, and when it has not stopped within
    ``stop_timeout_s`` of the block's end.
    """
    ipv6 = ":" in host
    sock = socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET)
    try:
        sock.bind((host, 0))
        sock.listen(128)
        port = sock.getsockname()[1]
        server = uvicorn_server(app, **uvicorn_config)
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
