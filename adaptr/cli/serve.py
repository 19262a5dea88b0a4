"""`adaptr serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import click

from ._common import with_registry


@click.command()
@click.option("--base", required=True, help="Registered base name whose adapters are served.")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (loopback by default).",
)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option(
    "--max-adapters", default=16, show_default=True, type=int, help="Adapters kept resident (LRU)."
)
@with_registry
def serve(registry, base: str, host: str, port: int, max_adapters: int) -> None:
    """Serve BASE and its adapters over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions)."""
    import uvicorn

    from adaptr.openai_server import create_app
    from adaptr.quiet import quiet_libraries
    from adaptr.serving import AdapterServer

    quiet_libraries()
    registry.get_base(base)  # a clear error for an unknown base before loading anything
    app = create_app(AdapterServer(registry, base, max_adapters=max_adapters))
    click.echo(
        f"serving {base} on http://{host}:{port}/v1 (model = an adapter ref, '{base}' or 'active')",
        err=True,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning")
