"""Base model commands: `adaptr base add`, `adaptr base list`."""

from __future__ import annotations

from pathlib import Path

import click

from adaptr.cli._common import emit_json, json_option, note, wide_option, with_registry
from adaptr.cli.table import print_table
from adaptr.values import WEIGHT_DTYPES


@click.group()
def base() -> None:
    """Register and list base models."""


@base.command("add")
@click.argument("name")
@click.argument("path")
@click.option(
    "--force", is_flag=True, help="Replace a base of the same name that is a different model."
)
@click.option(
    "--dtype",
    type=click.Choice(WEIGHT_DTYPES),
    default=None,
    help="For a GGUF file: the dtype its weights are dequantized to (default float32, exact).",
)
@with_registry
def base_add(registry, name: str, path: str, force: bool, dtype: str | None) -> None:
    """Register the model folder (or cached Hub id) PATH as base NAME.

    PATH may be a GGUF file: it is converted once (dequantized, with its tokenizer and chat
    template) into a cached safetensors folder under the registry home, which is registered.
    """
    from adaptr.bases import add_base

    rec, gguf = add_base(registry, name, path, dtype=dtype, force=force, on_note=note)
    origin = f", from {Path(gguf).name}" if gguf else ""
    click.echo(f"{rec.name} -> {rec.path} ({rec.fingerprint[:12]}{origin})")


@base.command("list")
@json_option
@wide_option
@with_registry
def base_list(registry, as_json: bool, wide: bool) -> None:
    """List registered bases with their fingerprints."""
    recs = registry.bases()
    if as_json:
        emit_json({"bases": [r.to_dict() for r in recs]})
        return
    if not recs:
        click.echo(
            f"no bases registered in {registry.home.resolve()}: add one with `adaptr base add NAME PATH`"
        )
        return
    rows = [
        (
            r.name,
            str(r.summary.get("model_type")),
            f"{r.summary.get('parameters', 0):,}",
            r.fingerprint[:12],
            r.path,
        )
        for r in recs
    ]
    print_table(
        ("NAME", "TYPE", "PARAMS", "FINGERPRINT", "PATH"), rows,
        right=("PARAMS",), keep_end=("PATH",), wide=wide,
    )  # fmt: skip
