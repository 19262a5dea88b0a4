"""OpenAI-shaped error answers (``{"error": {"message", "type", "param", "code"}}``): the
refusals the app gives itself and its handlers for what FastAPI and Starlette raise."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptr.serving.openai.http import error_body

ROUTES = (
    "GET /v1/models, GET /v1/models/ID, POST /v1/completions, POST /v1/chat/completions, "
    "GET /v1/adapters, POST /v1/load_lora_adapter, POST /v1/unload_lora_adapter, GET /health, "
    "GET /metrics"
)


class HTTPRefusal(Exception):
    """A refusal with its own status (413, 408...)."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.code = status, code


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An OpenAI-shaped JSON error answer."""
    body = error_body(status, message, param, code)
    return Response(body, status, headers, media_type="application/json")


async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
    return error_response(400, f"invalid request: {exc.errors()[0].get('msg', exc)}")


async def http_exception(request: Request, exc: StarletteHTTPException) -> Response:
    """An unknown route, a wrong method: the routes there are."""
    message = str(exc.detail)
    if exc.status_code in (404, 405):
        message = (
            f"{message}: {request.method} {request.url.path[:200]} is not a route of adaptr "
            f"serve ({ROUTES})"
        )
    return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))


async def internal_error(request: Request, exc: Exception) -> Response:
    """A bug: a 500 without its details (uvicorn logs it: the handler re-raises)."""
    return error_response(500, "internal error: the server's log has the details")


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(Exception, internal_error)
