"""``adaptr copy``: versions, with lineage, tags and evals, between two registry homes."""

from __future__ import annotations

import click

from adaptr.cli._common import emit_json, json_option, note


@click.command("copy")
@click.argument("src_home")
@click.argument("dst_home")
@click.argument("refs", nargs=-1)
@json_option
def copy_(src_home: str, dst_home: str, refs: tuple[str, ...], as_json: bool) -> None:
    """Copy versions from SRC_HOME to DST_HOME (each a folder or s3://BUCKET/PREFIX).

    REF: NAME (all its versions) or NAME@N/NAME@TAG; none: everything. Version numbers are
    kept where the destination has not used them; what is already there is skipped, so an
    interrupted copy finishes when run again.
    """
    from adaptr.registry import Registry
    from adaptr.registry.remote.copy import copy

    src = Registry(src_home)
    src.require()
    report = copy(src, Registry(dst_home), refs)
    if as_json:
        emit_json(report.to_dict())
        return
    for line in report.copied:
        click.echo(f"copied {line}")
    for line in report.tags:
        click.echo(f"tagged {line}")
    for n in report.notes:
        note(n)
    click.echo(
        f"{len(report.copied)} version(s) copied, {len(report.skipped)} already there, "
        f"{len(report.tags)} tag(s) set, {report.evals} eval record(s) copied"
    )
