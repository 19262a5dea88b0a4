"""Base model commands: `adaptr base add`, `adaptr base list`."""

from __future__ import annotations

import click

from ._common import emit_json, json_option, wide_option, with_registry
from .table import print_table


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
    from adaptr.registry.atomic import check_path

    check_path(path, "PATH")
    rec = registry.add_base(name, path, force=force)
    click.echo(f"{rec.name} -> {rec.path} ({rec.fingerprint[:12]})")


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
