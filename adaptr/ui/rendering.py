"""Pages and error answers from the UI's Jinja2 templates (autoescape on everywhere)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from adaptr.ui.context import UIContext
from adaptr.ui.lineage import version_href

HERE = Path(__file__).parent


@functools.cache
def templates():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every template, whatever its name
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["vhref"] = version_href
    return env


def render(request: Request | None, name: str, code: int = 200, **values: Any) -> HTMLResponse:
    ctx: UIContext | None = request.app.state.ctx if request is not None else None
    page = (
        templates()
        .get_template(name)
        .render(csrf=ctx.csrf if ctx else "", needs_token=bool(ctx and ctx.token), **values)
    )
    return HTMLResponse(page, code, headers={"cache-control": "no-store"})


def error_response(status: int, message: str, wants_json: bool = False, login: bool = False) -> Response:  # fmt: skip
    if wants_json:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status)
    return render(None, "error.html", status, status=status, message=message, login=login)
