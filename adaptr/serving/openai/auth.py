"""The API key: with one, every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer
KEY``. ``/health`` stays open, as vLLM's: probes carry no credentials, and it only says
ready or not (other paths are 404s, key or not)."""

from __future__ import annotations

import hmac

from adaptr.serving.openai.errors import error_response

MISSING = "invalid or missing API key: send 'Authorization: Bearer KEY' with the key adaptr serve was given"  # fmt: skip


GUARDED = frozenset({"/v1", "/metrics"})  # beside every /v1/... path


class APIKey:
    """ASGI middleware: every ``/v1`` route and ``/metrics`` need ``Authorization: Bearer KEY`` (a 401)."""

    def __init__(self, app, key: str):  # noqa: ANN001
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        path = scope.get("path", "")
        if scope["type"] == "http" and (path.startswith("/v1/") or path in GUARDED):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                response = error_response(
                    401, MISSING, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
