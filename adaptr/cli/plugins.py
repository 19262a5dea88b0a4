"""Plugin commands: `adaptr plugins`, `adaptr families`, `adaptr formatters`."""

from __future__ import annotations

import click

from adaptr.cli._common import emit_json, json_option, wide_option
from adaptr.cli.table import print_table


def warn_broken() -> None:
    """One stderr line per plugin that failed to load or in a hook (each once per command)."""
    from adaptr.extend.manager import PLUGINS

    for message in PLUGINS.take_warnings():
        click.echo(f"warning: {message}", err=True)


@click.command()
@wide_option
@json_option
def plugins(as_json: bool, wide: bool) -> None:
    """List installed plugins, the hooks they implement, and any that failed to load."""
    from adaptr.extend.manager import PLUGINS

    found = PLUGINS.listing()
    PLUGINS.take_warnings()  # the listing names every failure: no warning lines besides
    if as_json:
        emit_json({"plugins": found})
        return
    rows = [
        (
            p["name"],
            p["source"] or "-",
            ", ".join(h.removeprefix("adaptr_") for h in p["hooks"])
            if p["ok"]
            else "DISABLED (ADAPTR_DISABLE_PLUGINS)"
            if p.get("disabled")
            else f"BROKEN: {p['error']}",
        )
        for p in found
    ]
    print_table(("PLUGIN", "FROM", "HOOKS"), rows, wrap=("HOOKS",), wide=wide)


@click.command()
@wide_option
@json_option
def families(as_json: bool, wide: bool) -> None:
    """List model families: model types, LoRA target presets, defaults."""
    from adaptr.extend.catalog import families as all_families

    fams = all_families()
    warn_broken()
    if as_json:
        emit_json({"families": [f.to_dict() for f in fams.values()]})
        return
    rows = []
    for f in fams.values():
        targets = f.target_modules
        rows.append((
            f.name, ", ".join(f.model_types), _targets(targets.get("attention")), _targets(targets.get("all-linear")),
            ", ".join(f"{k}={v}" for k, v in f.lora_defaults.items()), f.plugin or "-",
        ))  # fmt: skip
    print_table(
        ("FAMILY", "MODEL TYPES", "ATTENTION", "ALL-LINEAR", "LORA DEFAULTS", "PLUGIN"), rows,
        wrap=("MODEL TYPES", "ATTENTION", "ALL-LINEAR"), below=("LORA DEFAULTS",), wide=wide,
    )  # fmt: skip


def _targets(value) -> str:
    return ", ".join(value) if isinstance(value, list) else str(value)


@click.command()
@wide_option
@json_option
def formatters(as_json: bool, wide: bool) -> None:
    """List dataset formatters (the values of `--format`)."""
    from adaptr.extend.catalog import formatters as all_formatters

    fmts = all_formatters()
    warn_broken()
    if as_json:
        emit_json({"formatters": [f.to_dict() for f in fmts.values()]})
        return
    rows = [
        (f.name, f.kind, ", ".join(f.fields), f.plugin or "-", f.description) for f in fmts.values()
    ]
    print_table(
        ("FORMAT", "EMITS", "FIELDS", "PLUGIN", "DESCRIPTION"), rows,
        wrap=("FIELDS",), below=("DESCRIPTION",), wide=wide,
    )  # fmt: skip
