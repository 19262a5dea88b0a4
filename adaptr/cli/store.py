"""Store maintenance commands: verify, gc, export."""

from __future__ import annotations

import sys

import click

from adaptr.values import human_size

from ._common import emit_json, json_option, note, with_registry


@click.command()
@click.argument("ref", required=False)
@json_option
@with_registry
def verify(registry, ref: str | None, as_json: bool) -> None:
    """Re-hash stored files (all, or REF's); exits non-zero on any mismatch."""
    if not registry.home.exists():
        from adaptr.errors import NotFoundError

        raise NotFoundError(
            f"no registry at {registry.home.resolve()}: nothing to verify; pass --home (or set "
            "ADAPTR_HOME) to the registry you mean"
        )
    report = registry.verify(ref)
    if as_json:
        emit_json(report.to_dict())
    else:
        for p in report.problems:
            click.echo(f"BAD  {p}", err=True)
        for n in report.notes:
            note(n)
        if report.unreferenced:
            note(
                f"{report.unreferenced} stored file(s), {human_size(report.unreferenced_bytes)}, "
                "belong to no version (removed ones): `adaptr gc` frees them"
            )
        state = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{state}: {report.versions} version(s), {report.files} file(s), {human_size(report.bytes)} checked"
        )
    if not report.ok:
        sys.exit(6)


@click.command()
@json_option
@with_registry
def gc(registry, as_json: bool) -> None:
    """Delete stored files that no version references."""
    report = registry.gc()
    if as_json:
        emit_json(report.to_dict())
        return
    if report.kept_unindexed:
        note(
            f"kept the files of {len(report.kept_unindexed)} version(s) missing from the index "
            f"({', '.join(report.kept_unindexed[:5])}): run `adaptr verify`, then `adaptr reindex`"
        )
    click.echo(
        f"removed {report.blobs_removed} unreferenced file(s), freed {human_size(report.bytes_freed + report.staged_removed_bytes)}"
    )


@click.command()
@json_option
@with_registry
def reindex(registry, as_json: bool) -> None:
    """Rebuild the index (registry.db) from the stored version manifests.

    For a registry.db that was deleted, emptied or damaged: versions, tags, active
    adapters and bases come back; the old file is kept beside it.
    """
    report = registry.reindex()
    if as_json:
        emit_json(report.to_dict())
        return
    for s in report.skipped:
        note(f"skipped {s}")
    if report.moved_aside:
        note(f"the previous index is kept at {report.moved_aside}")
    click.echo(
        f"rebuilt the index of {registry.home.resolve()}: {report.versions} version(s), "
        f"{report.tags} tag(s), {report.bases} base(s)"
    )


@click.command()
@click.argument("ref")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["peft", "vllm"]),
    default="peft",
    show_default=True,
    help="peft: every stored file; vllm: config + weights, checked for what vLLM can load.",
)
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@with_registry
def export(registry, ref: str, out_dir: str, fmt: str, force: bool) -> None:
    """Write REF as a plain PEFT adapter folder (loads with PeftModel.from_pretrained)."""
    if fmt == "vllm":  # the checks `adaptr check REF --engine vllm` and the vLLM resolver make
        from adaptr.serving.vllm.compat import check_servable

        check_servable(registry, registry.get(ref))
    out = registry.export(ref, out_dir, format=fmt, force=force)
    click.echo(str(out))
