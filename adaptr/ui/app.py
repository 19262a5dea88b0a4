"""The UI's Starlette app: routes as small functions over the app's :class:`UIContext`.

Pages (GET): ``/adapters`` (the list), ``/v/REF`` (one version), ``/curves``, ``/compare``,
``/playground``. Writes (POST, CSRF-checked, through the same library calls as the CLI):
``/v/REF/gate`` (a tag move's gate, checked, nothing moves), ``/v/REF/tag``, ``/v/REF/untag``,
``/v/REF/switch``, ``/switch/clear``; ``/playground/stream`` streams answers (SSE).

Every refusal is a page (or, for ``Accept: application/json``, an OpenAI-shaped JSON body)
with the one-line reason the CLI would print: an unknown ref or route 404, bad input 400,
a missing token 401, a write without the CSRF token or from another origin 403.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from adaptr.errors import AdaptrError, ConflictError, InvalidInputError, NotFoundError
from adaptr.ui import views
from adaptr.ui.context import CSRFError, UIContext
from adaptr.ui.lineage import version_href
from adaptr.ui.rendering import HERE, error_response, render
from adaptr.ui.security import COOKIE, Guard

if TYPE_CHECKING:
    from adaptr.registry import Registry

MAX_FORM_BYTES = 64 * 1024


def status_of(e: AdaptrError) -> int:
    if isinstance(e, CSRFError):
        return 403
    if isinstance(e, NotFoundError):
        return 404
    if isinstance(e, InvalidInputError):
        return 400
    return 409 if isinstance(e, ConflictError) else 422


def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


async def _adaptr_error(request: Request, e: AdaptrError) -> Response:
    return error_response(status_of(e), str(e).splitlines()[0] if str(e) else type(e).__name__, _wants_json(request))  # fmt: skip


async def _http_error(request: Request, e: HTTPException) -> Response:
    message = e.detail if e.status_code != 404 else f"no page at {request.url.path[:200]}"
    return error_response(e.status_code, str(message), _wants_json(request))


def ctx_of(request: Request) -> UIContext:
    return request.app.state.ctx


def registry_of(request: Request) -> Registry:
    return request.app.state.ctx.registry


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or not lo <= int(raw[:12]) <= hi:
        raise InvalidInputError(f"{name} takes a whole number from {lo} to {hi}, got {raw[:40]!r}")
    return int(raw)


def text_param(request: Request, name: str, limit: int = 200) -> str:
    value = request.query_params.get(name, "")
    if len(value) > limit:
        raise InvalidInputError(f"{name} is longer than {limit} characters")
    return value


async def form_of(request: Request) -> dict[str, Any]:
    """The POSTed form (url-encoded), CSRF-checked: a write without the token changes nothing."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise InvalidInputError(f"the form is larger than {MAX_FORM_BYTES // 1024} KB")
    from urllib.parse import parse_qs

    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=200)
    except (UnicodeDecodeError, ValueError) as e:
        raise InvalidInputError(f"the form cannot be read: {str(e)[:100]}") from None
    form = {k: v[-1] for k, v in fields.items()} | {"_lists": fields}
    ctx_of(request).check_csrf(request.headers.get("x-csrf-token") or form.get("csrf"))
    return form


async def off_loop(view, request: Request, *args: Any, lineage: bool = True):
    """``view(registry, versions, *args)`` on a worker thread: registry reads never hold
    up the event loop (and the playground streams on it)."""
    ctx = ctx_of(request)

    def build():
        return view(ctx.registry, ctx.versions(lineage), *args)

    return await run_in_threadpool(build)


def require_csrf(request: Request) -> None:
    ctx_of(request).check_csrf(request.headers.get("x-csrf-token"))


# ---------------------------------------------------------------------- pages
async def home(request: Request) -> Response:
    return RedirectResponse("/adapters", 302)


async def adapters(request: Request) -> Response:
    args = (text_param(request, "base"), text_param(request, "tag"), text_param(request, "q"),
            int_param(request, "page", 1, 1, 10**6))  # fmt: skip
    view = await off_loop(views.list_view, request, *args, lineage=False)
    name = "adapters_table.html" if request.headers.get("hx-request") else "adapters.html"
    return render(request, name, view=view, title="Adapters")


async def version(request: Request) -> Response:
    ref = request.path_params["ref"]
    view = await run_in_threadpool(views.version_view, registry_of(request), ref)
    return render(request, "version.html", view=view, title=view.ref, message=None)


async def curves(request: Request) -> Response:
    view = await off_loop(views.curves_view, request, request.query_params.getlist("ref"))
    return render(request, "curves.html", view=view, chart=view.chart(), title="Curves")


async def compare(request: Request) -> Response:
    sha = text_param(request, "data", 64)
    view = await off_loop(views.compare_view, request, request.query_params.getlist("ref"), sha)
    return render(request, "compare.html", view=view, title="Compare")


async def playground(request: Request) -> Response:
    ctx = ctx_of(request)
    refs = request.query_params.getlist("ref")
    view = await off_loop(views.playground_view, request, refs, ctx.loaded())
    return render(request, "playground.html", view=view, title="Playground")


async def login_page(request: Request) -> Response:
    return render(request, "error.html", 200, status=200, message="log in with the UI's token", login=True)  # fmt: skip


async def login(request: Request) -> Response:
    body = await request.body()
    from urllib.parse import parse_qs

    token = (parse_qs(body.decode("utf-8", "replace")[:4096]).get("token") or [""])[-1]
    ctx = ctx_of(request)
    if ctx.token is None or not ctx.check_token(token):
        return error_response(401, "wrong token", login=True)
    response = RedirectResponse("/adapters", 303)
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https")  # fmt: skip
    return response


# ---------------------------------------------------------------------- writes
def _gate_args(form: dict) -> tuple[str, list[str], str | None, str]:
    tag = form.get("tag", "").strip()
    requires = [c.strip() for c in form.get("require", "").replace("\n", ",").split(",") if c.strip()]  # fmt: skip
    better = form.get("better_than", "").strip() or None
    return tag, requires, better, form.get("data", "").strip()


def _outcome(request: Request, ref: str, ok: bool, lines: list[str], headline: str) -> Response:
    if request.headers.get("hx-request"):
        return render(request, "outcome.html", ok=ok, lines=lines, headline=headline, ref=ref)
    if not ok:
        return error_response(400, headline)
    return RedirectResponse(version_href(ref), 303)


async def gate(request: Request) -> Response:
    """A tag move's gate, checked without moving anything: what the move would do."""
    from adaptr.evaluation.gates import check_gate

    form = await form_of(request)
    reg = registry_of(request)
    v = reg.get(request.path_params["ref"])
    tag, requires, better, sha = _gate_args(form)
    from adaptr.registry.refs import check_tag

    check_tag(tag)
    if not requires and better is None:
        return _outcome(request, v.ref, True, [], f"no gate: {v.name}@{tag} would move to {v.ref}")
    seen = views.on_dataset(reg, sha, [v.ref])
    try:
        lines = check_gate(seen, v.ref, requires, better, tag=tag)
    except AdaptrError as e:
        return _outcome(request, v.ref, False, [], str(e))
    return _outcome(request, v.ref, True, lines, f"the gate passes: {v.name}@{tag} can move to {v.ref}")  # fmt: skip


async def tag(request: Request) -> Response:
    from adaptr.evaluation.gates import promote

    form = await form_of(request)
    reg = registry_of(request)
    ref = request.path_params["ref"]
    tag, requires, better, sha = _gate_args(form)
    seen = views.on_dataset(reg, sha, [reg.get(ref).ref])
    try:
        v, checked = promote(seen, ref, tag, requires, better)
    except AdaptrError as e:
        if isinstance(e, NotFoundError) and "tag" not in str(e):
            raise
        return _outcome(request, ref, False, [], str(e))
    return _outcome(request, v.ref, True, checked, f"{v.name}@{tag} -> {v.ref}")


async def untag(request: Request) -> Response:
    form = await form_of(request)
    reg = registry_of(request)
    v = reg.get(request.path_params["ref"])
    reg.untag(v.name, form.get("tag", ""))
    return _outcome(request, v.ref, True, [], f"removed tag {v.name}@{form.get('tag', '')}")


async def switch(request: Request) -> Response:
    form = await form_of(request)
    reg = registry_of(request)
    v = reg.get(request.path_params["ref"])
    ref = form.get("as") or v.ref  # NAME / NAME@tag follow new versions; NAME@N is pinned
    refs = [ref]
    if form.get("mode") == "add":
        refs = [r for r in reg.active().get(v.base or "", []) if r != ref] + [ref]
    base, active = reg.switch(*refs)
    return _outcome(request, v.ref, True, [], f"{base or '(no base)'}: active {', '.join(active)}")


async def clear(request: Request) -> Response:
    form = await form_of(request)
    base = form.get("base", "")
    reg = registry_of(request)
    reg.deactivate(base)
    back = form.get("back", "")
    return _outcome(request, back or "", True, [], f"{base}: no active adapter") if back else RedirectResponse("/adapters", 303)  # fmt: skip


async def stream(request: Request) -> Response:
    from adaptr.ui.playground import stream_response

    require_csrf(request)
    return await stream_response(request, ctx_of(request))


# ---------------------------------------------------------------------- the app
def routes() -> list:
    return [
        Route("/", home), Route("/adapters", adapters), Route("/curves", curves),
        Route("/compare", compare), Route("/playground", playground),
        Route("/playground/stream", stream, methods=["POST"]),
        Route("/login", login_page), Route("/login", login, methods=["POST"]),
        Route("/switch/clear", clear, methods=["POST"]),
        Route("/v/{ref}/gate", gate, methods=["POST"]), Route("/v/{ref}/tag", tag, methods=["POST"]),
        Route("/v/{ref}/untag", untag, methods=["POST"]),
        Route("/v/{ref}/switch", switch, methods=["POST"]),
        Route("/v/{ref:path}", version),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]  # fmt: skip


def create_app(
    registry: Registry | UIContext,
    *,
    token: str | None = None,
    allowed_hosts: tuple[str, ...] | None = None,  # fmt: skip
) -> Starlette:
    """The UI over ``registry`` (or a prepared :class:`UIContext`): ``token`` required on
    every route when given; ``allowed_hosts`` the Host headers answered (() : any)."""
    ctx = registry if isinstance(registry, UIContext) else UIContext(registry, token=token)
    if allowed_hosts is not None:
        ctx.allowed_hosts = tuple(h.lower() for h in allowed_hosts)
    if ctx.token is not None and not ctx.token:
        raise InvalidInputError("the UI token is empty: give a non-empty one, or none on loopback")
    app = Starlette(
        routes=routes(),
        exception_handlers={AdaptrError: _adaptr_error, HTTPException: _http_error},
    )
    app.state.ctx = ctx
    app.add_middleware(Guard, ctx=ctx)
    return app
