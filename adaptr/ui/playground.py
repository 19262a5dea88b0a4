"""The playground's stream: one prompt answered by several refs, token by token, over SSE.

The body is JSON: ``{"prompt": str, "refs": [ref | "base:NAME"…], "chat": bool,
"temperature": float, "max_tokens": int, "seed": int | null}``. Every ref must be on one
base (the engine is that base's :class:`~adaptr.serving.AdapterServer`, created on first
use). Each ref is one :class:`~adaptr.serving.requests.Request` submitted to the server's
scheduler together, so they decode in one mixed batch, exactly as ``AdapterServer.generate``
and the HTTP API run them (same greedy tokens).

Events: ``data: {"i": column, "text": piece}`` as text is ready, ``event: end`` with
``{"i", "reason"}``, ``event: error`` with ``{"i", "message"}`` for a column that failed,
``event: done`` last. A client that goes away cancels every row.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import StreamingResponse

from adaptr.errors import AdaptrError, InvalidInputError
from adaptr.ui.context import UIContext
from adaptr.ui.views import MAX_REFS

MAX_PROMPT = 16_000  # characters
MAX_TOKENS = 512
MAX_BODY = 256 * 1024


def _number(body: dict, key: str, default: float, lo: float, hi: float, whole: bool = False) -> Any:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (whole and not isinstance(value, int)):  # fmt: skip
        raise InvalidInputError(f"{key} takes a {'whole ' if whole else ''}number, got {json.dumps(value)[:40]}")  # fmt: skip
    if not lo <= value <= hi:
        raise InvalidInputError(f"{key} must be from {lo:g} to {hi:g}, got {value:g}")
    return value


def parse(raw: bytes) -> dict[str, Any]:
    """The request, checked; a one-line InvalidInputError naming what is wrong."""
    if len(raw) > MAX_BODY:
        raise InvalidInputError(f"the request is larger than {MAX_BODY // 1024} KB")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInputError("the request is not JSON") from None
    if not isinstance(body, dict):
        raise InvalidInputError("the request is a JSON object")
    prompt, refs = body.get("prompt"), body.get("refs")
    if not isinstance(prompt, str) or not prompt:
        raise InvalidInputError("prompt: give the text to complete")
    if len(prompt) > MAX_PROMPT:
        raise InvalidInputError(f"prompt is longer than {MAX_PROMPT} characters")
    if not isinstance(refs, list) or not refs or not all(isinstance(r, str) and r for r in refs):
        raise InvalidInputError("refs: choose one or more versions (or the bare base)")
    if len(refs) > MAX_REFS:
        raise InvalidInputError(f"refs: at most {MAX_REFS} at once, got {len(refs)}")
    chat = body.get("chat", False)
    if not isinstance(chat, bool):
        raise InvalidInputError("chat takes true or false")
    seed = body.get("seed")
    if seed is not None:
        seed = _number(body, "seed", 0, 0, 2**31 - 1, whole=True)
    return {
        "prompt": prompt, "refs": refs, "chat": chat, "seed": seed,
        "temperature": float(_number(body, "temperature", 0.0, 0.0, 2.0)),
        "max_tokens": _number(body, "max_tokens", 64, 1, MAX_TOKENS, whole=True),
    }  # fmt: skip


def resolve(ctx: UIContext, refs: list[str]) -> tuple[str, list[str | None]]:
    """The one base of ``refs`` and each row's adapter (None: the bare base)."""
    bases, adapters = set(), []
    for r in refs:
        if r.startswith("base:"):
            bases.add(r[5:])
            adapters.append(None)
        else:
            v = ctx.registry.get(r)
            if not v.base:
                raise InvalidInputError(f"{v.ref} has no base recorded: it cannot be served")
            bases.add(v.base)
            adapters.append(r)
    if len(bases) != 1:
        raise InvalidInputError(
            f"the playground runs one base at a time; these refs are on {', '.join(sorted(bases))}"
        )
    return bases.pop(), adapters


def _sse(data: dict, event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _requests(server, req: dict, adapters: list[str | None], on_event) -> list:
    """One scheduler request per column (errors of one column: an ("error", e) event)."""
    from adaptr.serving.requests import Request as Row
    from adaptr.serving.requests import Sampling

    sampling = Sampling(req["temperature"], 1.0, req["seed"])
    rows = []
    for i, adapter in enumerate(adapters):
        try:
            prompt = req["prompt"]
            if req["chat"]:
                prompt = server.render_chat([{"role": "user", "content": prompt}], adapter)
            ids = server.tokenizer(prompt).input_ids
        except AdaptrError as e:
            on_event(i, ("error", e))
            continue
        rows.append(Row(ids, adapter, req["max_tokens"], sampling,
                        on_event=lambda event, i=i: on_event(i, event)))  # fmt: skip
    return rows


async def stream_response(request: Request, ctx: UIContext) -> StreamingResponse:
    req = parse(await request.body())
    base, adapters = resolve(ctx, req["refs"])
    server = await run_in_threadpool(ctx.engine, base)  # loads the base on first use
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(i: int, event) -> None:  # (the scheduler's worker thread)
        loop.call_soon_threadsafe(queue.put_nowait, (i, *event))

    rows = await run_in_threadpool(_requests, server, req, adapters, on_event)
    server.enqueue(rows)  # back to back: they join the same decoding step

    async def events():
        open_ = len(adapters)
        try:
            yield _sse({"columns": len(adapters), "base": base}, "start")
            while open_:
                i, kind, value = await queue.get()
                if kind == "text":
                    yield _sse({"i": i, "text": value})
                    continue
                open_ -= 1
                if kind == "error":
                    message = str(value).splitlines()[0] if isinstance(value, AdaptrError) else f"failed: {type(value).__name__}: {value}"  # fmt: skip
                    yield _sse({"i": i, "message": message[:500]}, "error")
                else:
                    yield _sse({"i": i, "reason": value}, "end")
            yield _sse({}, "done")
        finally:
            for row in rows:
                row.cancel()  # the client left (or all ended): no row keeps decoding

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})  # fmt: skip
