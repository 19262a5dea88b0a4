"""`adaptr serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import ipaddress

import click

from adaptr.cli._common import with_registry


def is_loopback(host: str) -> bool:
    """Whether ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


@click.command()
@click.option(
    "--base",
    required=True,
    help="Base whose adapters are served: a name from `adaptr base list`, a model folder, or a "
    "GGUF file (converted once, as `train --base` does).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (loopback by default).",
)
@click.option(
    "--port",
    default=8000,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="TCP port to listen on.",
)
@click.option(
    "--max-adapters",
    default=16,
    show_default=True,
    type=click.IntRange(min=1),
    help="Adapters kept resident (least recently used evicted first; pinned ones count).",
)
@click.option(
    "--max-adapter-memory",
    "max_adapter_memory",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="MB the resident adapters' weights may take (least recently used evicted past it) "
    "[default: no limit].",
)
@click.option(
    "--pin",
    "pins",
    multiple=True,
    metavar="REF",
    help="Load REF at start and keep it resident, never evicted (repeatable; counts against "
    "--max-adapters). POST /v1/load_lora_adapter pins at runtime, /v1/unload_lora_adapter unpins.",
)
@click.option(
    "--api-key",
    envvar="ADAPTR_API_KEY",
    show_envvar=True,
    default=None,
    help="Require 'Authorization: Bearer KEY' on every /v1 route (401 otherwise).",
)
@click.option(
    "--max-body-mb",
    default=4.0,
    show_default=True,
    type=click.FloatRange(min=0, min_open=True),
    help="Largest request body; larger ones are refused with 413.",
)
@click.option(
    "--max-connections",
    default=512,
    show_default=True,
    type=click.IntRange(min=1),
    help="Concurrent connections and requests; past it the server answers 503.",
)
@click.option(
    "--threads",
    default=None,
    type=click.IntRange(min=1),
    help="Torch compute threads of the embedded engine [default: the cores this process may "
    "use less one, for the HTTP loop and tokenizing; at least 1].",
)
@click.option(
    "--engine",
    type=click.Choice(["embedded", "vllm"]),
    default="embedded",
    show_default=True,
    help="embedded: adaptr's own server; vllm: vLLM's OpenAI server fed by the registry.",
)
@click.argument("vllm_args", nargs=-1, type=click.UNPROCESSED)
@with_registry
def serve(
    registry,
    base: str,
    engine: str,
    vllm_args: tuple[str, ...],
    host: str,
    port: int,
    max_adapters: int,
    max_adapter_memory: float | None,
    pins: tuple[str, ...],
    api_key: str | None,
    max_body_mb: float,
    max_connections: int,
    threads: int | None,
) -> None:
    """Serve BASE and its adapters over an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions).

    For operators: GET /health (open), GET /metrics (Prometheus), GET /v1/adapters, and vLLM's
    POST /v1/load_lora_adapter and /v1/unload_lora_adapter ({"lora_name": REF}: pin, unpin).

    With --engine vllm, arguments after `--` go to vLLM (e.g. -- --tensor-parallel-size 2).
    """
    if engine == "vllm":
        if threads is not None:
            raise click.UsageError(
                "--threads is the embedded engine's; vLLM sets its own (e.g. VLLM_CPU_OMP_THREADS_BIND)"
            )
        if pins or max_adapter_memory is not None:
            raise click.UsageError(
                "--pin and --max-adapter-memory are the embedded engine's; vLLM takes its own "
                "(e.g. -- --max-loras 8)"
            )
        return _serve_vllm(registry, base, host, port, api_key, vllm_args)
    if vllm_args:
        raise click.UsageError(
            f"unexpected arguments {' '.join(vllm_args)}: only --engine vllm takes engine arguments after --"
        )
    from adaptr.runtime import quiet_libraries
    from adaptr.serving.openai.app import Limits, create_app
    from adaptr.serving.openai.http import uvicorn_server

    quiet_libraries()
    from adaptr.bases import served_base

    given, base = base, served_base(registry, base).key  # an unknown base: before any loading
    import torch

    # a compute thread per core starves the event loop and the tokenizing workers; on a busy
    # 2-core box two threads made decoding ~10x slower than one (bench/engines.py)
    torch.set_num_threads(threads or default_threads())
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20))
    app = create_app(
        _server(registry, base, max_adapters, max_adapter_memory, pins), api_key=api_key, limits=limits
    )
    _warn_if_open(host, port, api_key)
    click.echo(
        f"serving {given if given == base else f'{given} (as {base})'} on http://{host}:{port}/v1 "
        f"(model = an adapter ref, '{base}' or 'active')",
        err=True,
    )
    # the guarded protocol: header and body deadlines, OpenAI-shaped 400 and 503
    uvicorn_server(app, host=host, port=port, limit_concurrency=max_connections).run()


def _server(registry, base: str, max_adapters: int, memory_mb: float | None, pins):
    """The embedded engine with ``pins`` loaded and pinned (too many: an error before loading)."""
    from adaptr.errors import InvalidInputError
    from adaptr.serving import AdapterServer

    refs = [registry.get(ref).ref for ref in pins]  # an unknown ref: before loading anything
    if len(set(refs)) > max_adapters:
        raise InvalidInputError(
            f"--pin names {len(set(refs))} adapters, more than --max-adapters={max_adapters}: "
            "pin fewer or raise --max-adapters"
        )
    server = AdapterServer(registry, base, max_adapters=max_adapters, max_memory_mb=memory_mb)
    for ref in refs:
        server.pin(ref)
    return server


def default_threads() -> int:
    """The cores this process may use, less one (at least 1)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def _serve_vllm(registry, base: str, host: str, port: int, api_key, vllm_args) -> int:
    """Run vLLM's OpenAI server until it exits (signals are handed on to it); exiting on
    its own, it is a one-line error with its exit code and last words."""
    from adaptr.bases import registered_base
    from adaptr.serving.vllm.launch import command, run

    base = registered_base(registry, base, use="--engine vllm")
    extra = list(vllm_args)
    if api_key and "--api-key" not in extra:
        extra += ["--api-key", api_key]
    argv, env = command(registry, base, host=host, port=port, extra=extra)
    _warn_if_open(host, port, api_key)
    click.echo(
        f"serving {base} on vLLM at http://{host}:{port}/v1 (model = an adapter ref or '{base}'; "
        f"--max-lora-rank {env['ADAPTR_VLLM_MAX_LORA_RANK']})",
        err=True,
    )
    return run(argv, env)


def _warn_if_open(host: str, port: int, api_key: str | None) -> None:
    """A server reachable beyond this machine without a key says so."""
    if not api_key and not is_loopback(host):
        click.echo(
            f"warning: serving on {host} without an API key: anyone who can reach port {port} "
            "can use it (set --api-key or ADAPTR_API_KEY)",
            err=True,
        )
