"""Base model commands: `adaptr base add`, `adaptr base list`."""

from __future__ import annotations

from pathlib import Path

import click

from adaptr.cli._common import emit_json, json_option, note, wide_option, with_registry
from adaptr.cli.table import print_table
from adaptr.errors import InvalidInputError, clip


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
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default=None,
    help="For a GGUF file: the dtype its weights are dequantized to (default float32, exact).",
)
@with_registry
def base_add(registry, name: str, path: str, force: bool, dtype: str | None) -> None:
    """Register the model folder (or cached Hub id) PATH as base NAME.

    PATH may be a GGUF file: it is converted once (dequantized, with its tokenizer and chat
    template) into a cached safetensors folder under the registry home, which is registered.
    """
    from adaptr import gguf
    from adaptr.registry import check_name
    from adaptr.registry.atomic import check_path

    check_path(path, "PATH")
    check_name(name, "base name")
    if gguf.looks_like_gguf(path):
        folder = gguf.convert(
            path, dtype or gguf.DEFAULT_DTYPE, gguf.cache_dir(registry), on_note=note
        )
        rec = registry.add_base(name, folder, force=force)
        click.echo(f"{rec.name} -> {rec.path} ({rec.fingerprint[:12]}, from {Path(path).name})")
        return
    if dtype is not None:
        raise InvalidInputError(
            f"--dtype applies to GGUF files, and {clip(path, 200)} is not one: "
            "a model folder is registered as it is"
        )
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists():
        files = sorted(p.name for p in folder.glob("*.gguf"))
        if files:
            raise InvalidInputError(
                f"{clip(path, 200)} holds GGUF files ({', '.join(files[:3])}) and no config.json: "
                f"give the file, e.g. `adaptr base add {name} {folder / files[0]}`"
            )
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
