"""Shared CLI plumbing: the registry option, JSON and table output, size/time formatting."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import click


def with_registry(fn: Callable) -> Callable:
    """Add ``--home`` to a command and pass it a ``registry`` argument."""

    @click.option(
        "--home",
        type=click.Path(file_okay=False),
        default=None,
        help="Registry home (default: $ADAPTR_HOME or ~/.adaptr).",
    )
    @functools.wraps(fn)
    def wrapper(*args: Any, home: str | None = None, **kwargs: Any) -> Any:
        from adaptr.registry import Registry

        ctx = click.get_current_context()
        home = home or (ctx.find_root().params.get("home"))
        return fn(*args, registry=Registry(home), **kwargs)

    return wrapper


json_option = click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON document on stdout."
)
wide_option = click.option(
    "--wide",
    is_flag=True,
    help="Show every cell whole, however wide (default: fit the terminal, 80 columns if none).",
)


format_option = click.option(
    "--format-option",
    "format_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Formatter option, e.g. lang=en or field=quote (repeatable).",
)


def key_values(items: tuple[str, ...], flag: str, shape: str = "KEY=VALUE") -> dict[str, Any]:
    """``KEY=VALUE`` flags as a mapping, each value read as YAML (``2e-4``, ``[a, b]``, ``true``)."""
    from adaptr.errors import brief
    from adaptr.training.recipe import load_yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"{flag} takes {shape}, got {brief(item)}")
        out[key] = load_yaml(value, f"{flag} {key}")
    return out


def emit_json(doc: Any) -> None:
    """One JSON document on stdout: indented for a person, compact (C-encoded, fast) for a pipe."""
    indent = 2 if sys.stdout.isatty() else None
    sys.stdout.write(json.dumps(doc, indent=indent, default=str, ensure_ascii=False) + "\n")


def console():
    from rich.console import Console

    out = Console(highlight=False, soft_wrap=False)
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out.width = 250  # piped or captured: never truncate hashes and paths to 80 columns
    return out


def note(message: str) -> None:
    """A non-fatal remark on stderr."""
    click.echo(f"note: {message}", err=True)
