"""Store maintenance commands: verify, gc, export."""

from __future__ import annotations

import sys

import click

from adaptr.cli._common import emit_json, json_option, note, with_registry
from adaptr.values import human_size


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
@click.option(
    "--grace",
    type=float,
    default=None,
    metavar="SECONDS",
    help="s3:// homes: keep unreferenced files younger than this (default 3600).",
)
@json_option
@with_registry
def gc(registry, grace: float | None, as_json: bool) -> None:
    """Delete stored files that no version references.

    On an s3:// home, only files older than the grace period (--grace, else
    $ADAPTR_REMOTE_GC_GRACE, else one hour) with no recent upload marker: a file another
    machine's add is still uploading is never deleted.
    """
    from adaptr.errors import InvalidInputError

    if grace is not None:
        if not hasattr(registry, "store"):
            raise InvalidInputError("--grace is for s3:// homes; a local gc holds the writer lock")
        if grace < 0:
            raise InvalidInputError(f"--grace must be 0 or more seconds, not {grace:g}")
        report = registry.gc(grace=grace)
    else:
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
@click.option(
    "--force",
    is_flag=True,
    help="Rebuild even when state.json and the old index are both unreadable (tags, active "
    "adapters and bases are then lost; version numbers stay unique).",
)
@json_option
@with_registry
def reindex(registry, force: bool, as_json: bool) -> None:
    """Rebuild the index (registry.db) from the stored version manifests.

    For a registry.db that was deleted, emptied or damaged: versions, tags, active
    adapters and bases come back; the old file is kept beside it. The new index is built
    beside the old one and swapped in only when complete. Exits 6 when a manifest was
    damaged (its version is not restored; its files are kept).
    """
    report = registry.reindex(force=force)
    if as_json:
        emit_json(report.to_dict())
    else:
        for r in report.repaired:
            note(f"rewrote the damaged or missing manifest of {r} from the old index")
        if report.state_problem:
            note(report.state_problem)
        for s in report.skipped:
            note(f"skipped {s}")
        for d in report.damaged:
            click.echo(
                f"BAD  {d}: not restored; gc keeps every stored file until it is mended", err=True
            )
        if report.moved_aside:
            note(f"the previous index is kept at {report.moved_aside}")
        click.echo(
            f"rebuilt the index of {registry.home.resolve()}: {report.versions} version(s), "
            f"{report.tags} tag(s), {report.bases} base(s)"
        )
    if report.damaged:
        sys.exit(6)


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
    from adaptr.registry.atomic import check_path, exit_on_sigterm, refuse_in_home

    check_path(out_dir, "OUT_DIR")
    refuse_in_home(out_dir, registry.home, "an export")  # before export, which replaces OUT_DIR
    if fmt == "vllm":  # the checks `adaptr check REF --engine vllm` and the vLLM resolver make
        from adaptr.serving.vllm.compat import check_servable

        check_servable(registry, registry.get(ref))
    with exit_on_sigterm():  # its work folder is removed on the way out
        out = registry.export(ref, out_dir, format=fmt, force=force)
    click.echo(str(out))
