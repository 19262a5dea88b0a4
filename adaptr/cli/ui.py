"""`adaptr ui`: the local web UI (pages over the registry, curves, compare, a playground)."""

from __future__ import annotations

import click

from adaptr.cli._common import with_registry


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (loopback by default; any other needs --token).")  # fmt: skip
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535), help="TCP port to listen on.")  # fmt: skip
@click.option(
    "--token", "--api-key", "token", envvar="ADAPTR_UI_TOKEN", show_envvar=True, default=None,
    help="Require this token on every page (Authorization: Bearer, or the login page's cookie); "
    "needed off loopback.",
)  # fmt: skip
@click.option("--base", default=None, help="Load this base's playground engine at start (default: on first use): a registered name, or the folder or GGUF file it was registered from.")  # fmt: skip
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Torch compute threads of the playground [default: the cores less one].")  # fmt: skip
@with_registry
def ui(registry, host: str, port: int, token: str | None, base: str | None, threads: int | None) -> None:  # fmt: skip
    """Serve the web UI: adapters, versions, lineage, curves, compare, a playground.

    Everything is in the package (no build step, nothing fetched). Pages never load torch;
    the playground loads a base the first time it is used (or at start with --base).
    """
    from adaptr.cli.serve import default_threads, is_loopback

    if token is not None and not token.strip():
        raise click.UsageError("--token is empty: give a non-empty token (or none on loopback)")
    if not is_loopback(host) and not token:
        raise click.UsageError(
            f"--host {host} is reachable from other machines: give --token (or set "
            "ADAPTR_UI_TOKEN); without one the UI only binds to loopback"
        )
    if base is not None:  # an unknown base: a one-line error before anything starts
        from adaptr.bases import registered_base

        base = registered_base(registry, base, use="the playground")

    from adaptr.serving.openai.http import uvicorn_server
    from adaptr.ui.app import create_app
    from adaptr.ui.context import UIContext

    hosts = ("127.0.0.1", "localhost", "[::1]") if is_loopback(host) else ()
    ctx = UIContext(registry, token=token, allowed_hosts=hosts)
    _set_threads(threads or default_threads())
    if base is not None:
        import threading

        threading.Thread(target=ctx.engine, args=(base,), daemon=True).start()
    url = f"http://{host}:{port}/"
    click.echo(f"adaptr ui on {url} (registry {registry.home})" + (" — log in with the token" if token else ""), err=True)  # fmt: skip
    uvicorn_server(create_app(ctx), host=host, port=port).run()


def _set_threads(n: int) -> None:
    """Torch's threads, set when the playground first imports it (pages never do)."""
    import os

    os.environ.setdefault("OMP_NUM_THREADS", str(n))
