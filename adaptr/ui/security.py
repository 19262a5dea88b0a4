"""The UI's guards, one ASGI middleware: Host check, token, same-origin writes, headers.

- Host: only the names in ``UIContext.allowed_hosts`` are answered (bound to loopback:
  127.0.0.1, localhost, [::1]), so a page on another site that rebinds its DNS name to
  127.0.0.1 gets a 400, not the registry.
- Token: with ``UIContext.token`` set (required off loopback), every route but the static
  files and ``/login`` needs ``Authorization: Bearer TOKEN`` or the ``adaptr_ui`` cookie
  ``/login`` sets (HttpOnly, SameSite=Strict).
- Writes (every method but GET/HEAD/OPTIONS): an ``Origin`` (or, without one, a
  ``Referer``) naming another host:port than the request's is a 403; the CSRF token is
  checked by each write route (:func:`adaptr.ui.app.require_csrf`).
- Every answer: a Content-Security-Policy allowing only the app's own scripts (no inline
  script runs: data reach the page as JSON in ``<script type="application/json">``), no
  framing, no sniffing, no referrer.
"""

from __future__ import annotations

from http.cookies import SimpleCookie
from urllib.parse import urlsplit

COOKIE = "adaptr_ui"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
OPEN_PATHS = ("/static/", "/login")
HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
     b"connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
]  # fmt: skip


def _headers(scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _host_name(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def token_of(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    cookie = SimpleCookie()
    try:
        cookie.load(headers.get("cookie", ""))
    except Exception:  # a malformed Cookie header: no token
        return None
    return cookie[COOKIE].value if COOKIE in cookie else None


class Guard:
    def __init__(self, app, ctx):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = _headers(scope)
        host = headers.get("host", "")
        refusal = None
        if self.ctx.allowed_hosts and _host_name(host).lower() not in self.ctx.allowed_hosts:
            refusal = (400, f"unexpected Host header {host[:80]!r}: open the UI at the address it printed")  # fmt: skip
        elif (
            self.ctx.token is not None
            and not scope["path"].startswith(OPEN_PATHS)
            and not self.ctx.check_token(token_of(headers))
        ):
            refusal = (401, "this UI needs its token: open the address `adaptr ui` printed, or log in")  # fmt: skip
        if refusal is None and scope["method"] not in SAFE_METHODS:
            refusal = _cross_origin(headers, host)
        if refusal is not None:
            return await _refuse(scope, receive, send, *refusal)

        async def with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers)


def _cross_origin(headers: dict[str, str], host: str) -> tuple[int, str] | None:
    origin = headers.get("origin") or headers.get("referer")
    if origin is None:
        return None  # not a browser's cross-site form or fetch (they send Origin on POST)
    if origin == "null" or urlsplit(origin).netloc.lower() != host.lower():
        return (403, f"a write from another origin ({origin[:80]!r}) is refused; nothing was changed")  # fmt: skip
    return None


async def _refuse(scope, receive, send, status: int, message: str) -> None:
    from adaptr.ui.rendering import error_response  # starlette and jinja2 only when refusing

    wants_json = "application/json" in _headers(scope).get("accept", "")
    response = error_response(status, message, wants_json, login=status == 401)
    response.headers.update({k.decode(): v.decode() for k, v in HEADERS})
    await response(scope, receive, send)
