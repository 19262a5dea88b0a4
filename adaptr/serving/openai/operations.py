"""The routes an operator uses: health, metrics, what is resident, runtime load and unload.

- ``GET /health``: 200 ``{"status": "ok"}`` once the base is loaded and the batch worker can
  run; a 503 before the app started and from the start of its shutdown. Open without the
  API key, as vLLM's (load balancers and orchestrators probe it without credentials; it says
  nothing but whether the server is ready).
- ``GET /metrics``: Prometheus' text format (:mod:`adaptr.serving.metrics`), from a
  ``CollectorRegistry`` of the app's own. Behind the API key, as every ``/v1`` route.
- ``GET /v1/adapters``: every adapter version of the base: resident, pinned, slot (a number,
  ``"peft"`` when PEFT's path serves it), its bytes, when it was loaded and last used, the
  requests and tokens it served.
- ``POST /v1/load_lora_adapter`` (vLLM's body, ``{"lora_name": REF}``): the ref (``NAME``,
  ``NAME@N``, ``NAME@tag``) resolved, loaded and pinned. ``lora_path`` may be left out or name
  the same ref; a folder is refused (400): add it to the registry first (``adaptr add``), an
  HTTP client does not make the server read its files. Pins count against
  ``--max-adapters`` (one more is a 400).
- ``POST /v1/unload_lora_adapter`` (``{"lora_name": REF}``): unpinned and evicted (a later
  request loads it again, from the registry). 404 for an unknown ref or one not loaded; 409
  while running requests use it (nothing changes: unload it once they finish).
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from adaptr.errors import AdaptrError, NotFoundError
from adaptr.serving.openai.context import AppContext, context_of, read_body
from adaptr.serving.openai.errors import HTTPRefusal, error_response
from adaptr.serving.openai.prepare import parse_body, resolve
from adaptr.serving.openai.protocol import ParamError
from adaptr.serving.server import AdapterInUse

LOAD_FIELDS = ("lora_name", "lora_path")


async def health(request: Request) -> Response | dict:
    ctx = context_of(request)
    if ctx.scheduler is None or ctx.stopping:
        why = "shutting down" if ctx.stopping else "starting"
        return error_response(503, f"not ready: the server is {why}", None, "not_ready")
    current = ctx.server.started_scheduler  # (a closed one is started again on the next request)
    if current is not None and not current.closed and not current.thread.is_alive():
        return error_response(503, "not ready: the batch worker ended", None, "not_ready")
    return {"status": "ok", "base": ctx.server.base_key}


async def metrics(request: Request) -> Response:
    ctx = context_of(request)
    body, kind = await asyncio.to_thread(_scrape, ctx)
    return Response(body, 200, media_type=kind)


def _scrape(ctx: AppContext) -> tuple[bytes, str]:
    from adaptr.serving.metrics import exposition, registry_for

    if ctx.metrics is None:
        ctx.metrics = registry_for(ctx.server)
    return exposition(ctx.metrics)


async def list_adapters(request: Request) -> dict:
    ctx = context_of(request)
    return await asyncio.to_thread(_listing, ctx)


def _listing(ctx: AppContext) -> dict:
    server = ctx.server
    versions = [v for v in server.registry.list(lineage=False) if v.base == server.base_key]
    with server.lock:  # (the worker changes the slots under it)
        residents = {r.ref: r for r in server.slots.residents()}
        used = {v.ref: server.slots.last_used(v.ref) for v in versions}
    data = [_entry(ctx, v.ref, v.name, v.version, v.tags, residents, used.get(v.ref)) for v in versions]
    for ref in residents.keys() - used.keys():  # deleted from the registry while resident
        name, _, number = ref.rpartition("@")
        data.append(_entry(ctx, ref, name, int(number), [], residents, residents[ref].last_used))
    return {
        "object": "list", "data": data, "base": server.base_key,
        "max_adapters": server.max_adapters,
        "max_memory_mb": None if server.max_memory is None else server.max_memory / 2**20,
        "resident_bytes": sum(r.bytes for r in residents.values()),
    }  # fmt: skip


def _entry(ctx: AppContext, ref: str, name: str, version: int, tags: list, residents: dict,
           last_used: float | None) -> dict:  # fmt: skip
    r = residents.get(ref)
    use = ctx.server.stats.of(ref)
    return {
        "id": ref, "object": "adapter", "name": name, "version": version,
        "base": ctx.server.base_key, "tags": list(tags), "resident": r is not None,
        "pinned": bool(r and r.pinned),
        "slot": None if r is None else "peft" if r.slot == 0 else r.slot,
        "bytes": r.bytes if r else None, "loaded_at": r.loaded if r else None,
        "last_used": last_used, "requests": use.requests, "finished": use.finished,
        "prompt_tokens": use.prompt_tokens, "generation_tokens": use.generation_tokens,
    }  # fmt: skip


async def load_adapter(request: Request) -> Response | dict:
    return await _change(request, load=True)


async def unload_adapter(request: Request) -> Response | dict:
    return await _change(request, load=False)


async def _change(request: Request, load: bool) -> Response | dict:
    """Load and pin, or unpin and evict, the adapter the body names; its entry after."""

    ctx = context_of(request)
    try:
        body = parse_body(await read_body(request, ctx.limits))
        ref = await asyncio.to_thread(_ref, ctx, body, load)
        if load:
            await asyncio.to_thread(ctx.server.pin, ref)
        else:
            await asyncio.to_thread(ctx.server.unload, ref)
        listing = await asyncio.to_thread(_listing, ctx)
        return next(entry for entry in listing["data"] if entry["id"] == ref)
    except HTTPRefusal as e:
        return error_response(e.status, str(e), None, e.code, {"Connection": "close"})
    except AdapterInUse as e:
        return error_response(409, str(e), "lora_name", "adapter_in_use")
    except NotFoundError as e:
        return error_response(404, str(e), "lora_name", getattr(e, "code", "model_not_found"))
    except AdaptrError as e:
        return error_response(400, str(e), getattr(e, "param", None), getattr(e, "code", None))


def _ref(ctx: AppContext, body: dict, load: bool) -> str:
    """The exact ref of the adapter the body names (vLLM's ``lora_name``)."""
    fields = LOAD_FIELDS if load else LOAD_FIELDS[:1]
    extra = [k for k in body if k not in fields]
    if extra:
        raise ParamError(
            str(extra[0])[:60],
            f"{str(extra[0])[:60]!r} is not taken here (it takes {', '.join(fields)})",
        )
    name: Any = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise ParamError("lora_name", "'lora_name' must name an adapter: NAME, NAME@VERSION or NAME@TAG")
    ref = resolve(ctx, name)
    if ref is None:
        raise ParamError("lora_name", f"{name} is the base: it is always loaded; name one of its adapters")
    path = body.get("lora_path")
    if path not in (None, "", name, ref):
        raise ParamError(
            "lora_path",
            "adaptr serve loads adapters from its registry by ref, not from a folder: add it "
            f"with `adaptr add NAME {str(path)[:100]} --base {ctx.server.base_key}`, then load "
            "{'lora_name': 'NAME'}",
        )
    return ref


ROUTES = [
    ("/health", health, "GET"),
    ("/metrics", metrics, "GET"),
    ("/v1/adapters", list_adapters, "GET"),
    ("/v1/load_lora_adapter", load_adapter, "POST"),
    ("/v1/unload_lora_adapter", unload_adapter, "POST"),
]
