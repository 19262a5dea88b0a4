"""Base model commands: `adaptr base add`, `adaptr base list`."""

from __future__ import annotations

import click

from ._common import console, emit_json, json_option, with_registry


@click.group()
def base() -> None:
    """Register and list base models."""


@base.command("add")
@click.argument("name")
@click.argument("path")
@click.option(
    "--force", is_flag=True, help="Replace a base of the same name that is a different model."
)
@with_registry
def base_add(registry, name: str, path: str, force: bool) -> None:
    """Register the model folder (or cached Hub id) PATH as base NAME."""
    rec = registry.add_base(name, path, force=force)
    click.echo(f"{rec.name} -> {rec.path} ({rec.fingerprint[:12]})")


@base.command("list")
@json_option
@with_registry
def base_list(registry, as_json: bool) -> None:
    """List registered bases with their fingerprints."""
    recs = registry.bases()
    if as_json:
        emit_json({"bases": [r.to_dict() for r in recs]})
        return
    if not recs:
        click.echo("no bases registered: add one with `adaptr base add NAME PATH`")
        return
    from rich.table import Table

    table = Table(box=None, header_style="bold")
    for col in ("NAME", "TYPE", "PARAMS", "FINGERPRINT", "PATH"):
        table.add_column(col)
    for r in recs:
        s = r.summary
        table.add_row(
            r.name,
            str(s.get("model_type")),
            f"{s.get('parameters', 0):,}",
            r.fingerprint[:12],
            r.path,
        )
    console().print(table)
