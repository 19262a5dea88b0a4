"""Adapter commands: add, list, show, tag, rm, switch."""

from __future__ import annotations

import json

import click

from adaptr.cli._common import emit_json, json_option, note, wide_option, with_registry
from adaptr.cli.table import print_table
from adaptr.values import ago, human_size


@click.command()
@click.argument("name")
@click.argument("source_dir", type=click.Path())
@click.option(
    "--base",
    help="Base model: a name from `adaptr base list`, a model folder, a GGUF file (its "
    "conversion, made once) or a Hub id.",
)
@click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable).")
@click.option(
    "--allow-large",
    is_flag=True,
    help="Store files past the size limits (weights over 20 GB, other files over 50 MB).",
)
@with_registry
def add(
    registry, name: str, source_dir: str, base: str | None, tags: tuple[str, ...], allow_large: bool
) -> None:
    """Import a PEFT adapter folder as the next version of NAME; prints NAME@N."""
    from adaptr.registry.atomic import check_path

    check_path(source_dir, "SOURCE_DIR")
    check_path(base, "--base")
    if base is not None:
        from adaptr.gguf import looks_like_gguf

        if looks_like_gguf(base):  # the conversion `train --base FILE.gguf` trains on
            from adaptr.bases import resolve_base

            base = resolve_base(base, registry).key
    v = registry.add(name, source_dir, base=base, tags=tags, allow_large=allow_large)
    for n in v.notes:
        note(n)
    click.echo(v.ref)


@click.command("list")
@click.argument("name", required=False)
@click.option(
    "-a", "--all-versions", is_flag=True, help="One row per version instead of per adapter."
)
@json_option
@wide_option
@with_registry
def list_(registry, name: str | None, all_versions: bool, as_json: bool, wide: bool) -> None:
    """List adapters: stored versions, base, rank, size, tags (TAG@N: on an older version), active."""
    versions = registry.list(name)
    if as_json:
        emit_json({"adapters": _grouped(versions), "active": registry.active()})
        return
    if not versions:
        home = registry.home.resolve()
        if not home.exists():
            click.echo(
                f"no registry at {home} (nothing was created there): add an adapter with "
                "`adaptr add NAME DIR` or `adaptr train`, or pass --home (or set ADAPTR_HOME) "
                "to the registry you mean"
            )
        else:
            click.echo(
                f"no adapters yet in {home}: add one with `adaptr add NAME DIR` or `adaptr train`"
            )
        return
    rows = []
    per_version = all_versions or name is not None
    for group in _by_name(versions).values():
        newest = group[-1]
        for v in group if per_version else [newest]:
            if per_version:
                ver, tags, active = f"@{v.version}", ", ".join(v.tags), "*" if v.active else ""
                row = (v.name, ver)
            else:  # one row per adapter: tags and active state of any version, marked where not newest
                tags = ", ".join(
                    t if o is newest else f"{t}@{o.version}" for o in group for t in o.tags
                )
                active = ", ".join(
                    "*" if o is newest else f"@{o.version}" for o in group if o.active
                )
                row = (v.name, _ranges([o.version for o in group]))
            rows.append((
                *row, v.base or "-", _kind(v), str(v.r or "-"), human_size(v.size),
                tags or "-", active, ago(v.created),
            ))  # fmt: skip
    head = ("NAME", "VERSION") if per_version else ("NAME", "VERSIONS")
    print_table(
        (*head, "BASE", "TYPE", "RANK", "SIZE", "TAGS", "ACTIVE", "CREATED"), rows,
        right=("RANK", "SIZE"), wrap=("VERSIONS", "TAGS", "ACTIVE", "CREATED"), keep_end=("BASE",),
        wide=wide,
    )  # fmt: skip


def _sorted(value):
    """PEFT saves target_modules from a set: its order changes from run to run."""
    return sorted(value) if isinstance(value, list) else value


def _ranges(numbers: list[int]) -> str:
    """Stored version numbers, compactly: ``@1-3``, ``@1, @4-6`` (the newest is the last)."""
    runs: list[list[int]] = []
    for n in sorted(numbers):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(f"@{r[0]}" if len(r) == 1 else f"@{r[0]}-{r[-1]}" for r in runs)


def _by_name(versions) -> dict[str, list]:
    groups: dict[str, list] = {}
    for v in versions:
        groups.setdefault(v.name, []).append(v)
    return groups


def _kind(v) -> str:
    s = v.summary
    flags = [f for f, on in (("dora", s.get("use_dora")), ("rslora", s.get("use_rslora"))) if on]
    return (v.peft_type or "?").lower() + (f"+{'+'.join(flags)}" if flags else "")


def _grouped(versions) -> list[dict]:
    return [
        {"name": n, "versions": [v.to_dict() for v in g]} for n, g in _by_name(versions).items()
    ]


@click.command()
@click.argument("ref")
@json_option
@wide_option
@with_registry
def show(registry, ref: str, as_json: bool, wide: bool) -> None:
    """Show one version: config, lineage, metrics, files and hashes."""
    v = registry.get(ref)
    evals = registry.evals(v.ref)
    if as_json:
        emit_json({**v.to_dict(), "evals": evals})
        return
    s = v.summary
    rows = [
        ("ref", v.ref + ("  (active)" if v.active else "")),
        ("tags", ", ".join(v.tags) or "-"),
        ("created", ago(v.created)),
        ("base", v.base or "-"),
        ("base fingerprint", v.base_fingerprint or "-"),
        ("type", _kind(v)),
        ("r / alpha / dropout", f"{s.get('r')} / {s.get('lora_alpha')} / {s.get('lora_dropout')}"),
        ("target modules", json.dumps(_sorted(s.get("target_modules")))),
        ("LoRA modules", str(s.get("lora_modules"))),
        ("parameters", f"{s.get('parameters', 0):,} ({', '.join(s.get('dtypes', []))})"),
        ("size", human_size(v.size)),
        ("source", v.source or "-"),
    ]
    rows += [
        (k, json.dumps(s[k]))
        for k in ("rank_pattern", "alpha_pattern", "modules_to_save")
        if s.get(k)
    ]
    extra = {
        k: val for k, val in v.lineage.items() if k not in ("source", "base", "base_fingerprint")
    }
    history = extra.pop("log_history", None)  # drawn by `adaptr curves`, not listed
    for section, doc in (("lineage", extra), ("metrics", v.metrics)):
        rows += [
            (f"{section}.{k}", val if isinstance(val, str) else json.dumps(val, default=str))
            for k, val in doc.items()
        ]
    if isinstance(history, list):
        rows.append(("training log", f"{len(history)} entries: `adaptr curves {v.ref}` draws it"))
    width = max(len(k) for k, _ in rows)
    click.echo("\n".join(f"{k:<{width}}  {val}" for k, val in rows) + "\n")
    print_table(
        ("FILE", "SIZE", "SHA256"),
        [(f.path, human_size(f.size), f.sha256) for f in v.files],
        right=("SIZE",),
        wide=wide,
    )
    if evals:
        click.echo()
        print_table(
            ("EVALUATED", "DATA", "SHA256", "METRICS"),
            [
                (
                    ago(e.get("created", 0)),
                    (e.get("dataset") or {}).get("path", "-"),
                    (e.get("dataset") or {}).get("sha256", "-")[:12],
                    "  ".join(_metric(k, val, e) for k, val in (e.get("metrics") or {}).items()),
                )
                for e in evals
            ],
            wrap=("METRICS",),
            keep_end=("DATA",),
            wide=wide,
        )


def _metric(name: str, value, record: dict) -> str:
    """``name value``, BLEU with its tokenizer when not sacrebleu's default (13a)."""
    from adaptr.evaluation.records import bleu_tokenizer_of
    from adaptr.values import is_number

    tokenize = bleu_tokenizer_of(record) if name == "bleu" else "13a"
    if tokenize != "13a":
        name = f"bleu[{tokenize}]"
    return f"{name} {value:.4g}" if is_number(value, finite=False) else f"{name} {value!r} (not a number)"


@click.command()
@click.argument("ref")
@click.argument("tag")
@click.option("-d", "--delete", is_flag=True, help="Remove TAG from the adapter REF names instead.")
@click.option(
    "--require",
    "requires",
    multiple=True,
    metavar="COND",
    help="Move the tag only if REF's stored evals meet COND: METRIC OP VALUE with OP one of "
    ">=, <=, >, <, == (e.g. 'chrf>=40', 'loss<=1.5'); repeatable, all must hold.",
)
@click.option(
    "--require-better-than",
    "better_than",
    metavar="REF2",
    help="Move the tag only if REF is no worse than REF2 on every metric both have stored for "
    "the same data with the same settings (lower loss/ppl, higher exact/chrf/bleu/rougeL). "
    "REF2: a version, NAME@TAG, or a bare tag of REF's adapter (e.g. prod). If REF2 is the "
    "tag being moved and it does not exist yet (a first promotion), there is nothing to "
    "compare against: the tag is set, with a note, and --require still applies.",
)
@click.option(
    "--data",
    type=click.Path(dir_okay=False),
    help="Gates read only the evals on this data file (by SHA-256). Without it a --require "
    "metric measured on several datasets is refused as ambiguous.",
)
@with_registry
def tag(
    registry,
    ref: str,
    tag: str,
    delete: bool,
    requires: tuple[str, ...],
    better_than: str | None,
    data: str | None,
) -> None:
    """Point NAME@TAG at REF (moving the tag if it exists).

    With --require / --require-better-than the tag moves only if REF's stored evals (`adaptr
    eval`) pass; a refusal is one line naming the metric, and nothing moves.
    """
    if delete:
        if requires or better_than is not None or data:
            raise click.UsageError(
                "--require, --require-better-than and --data gate a tag move, not --delete"
            )
        from adaptr.registry import Ref

        name = Ref.parse(ref).name
        registry.untag(name, tag)
        click.echo(f"removed tag {name}@{tag}")
        return
    if data and not (requires or better_than is not None):
        raise click.UsageError(
            "--data chooses the evals a gate reads: add --require or --require-better-than"
        )
    from adaptr.evaluation.gates import promote

    v, checked = promote(registry, ref, tag, requires, better_than, data=data)
    for line in checked:
        note(f"gate passed: {line}" if "does not exist yet" not in line else line)
    click.echo(f"{v.name}@{tag} -> {v.ref}")


@click.command()
@click.argument("ref")
@click.option("--all", "all_versions", is_flag=True, help="Remove every version of the name.")
@click.option(
    "--force", is_flag=True, help="Remove even if a tag or the active state points at it."
)
@with_registry
def rm(registry, ref: str, all_versions: bool, force: bool) -> None:
    """Remove a version (files are freed by `adaptr gc`)."""
    gone = registry.remove(ref, force=force, all_versions=all_versions)
    for v in gone:
        click.echo(f"removed {v.ref}")
    freed = registry.reclaimable()
    if freed:
        note(f"{human_size(freed)} can be freed with `adaptr gc`")


@click.command()
@click.argument("refs", nargs=-1)
@click.option(
    "--clear", "clear_base", metavar="BASE", help="Deactivate every adapter of BASE instead."
)
@with_registry
def switch(registry, refs: tuple[str, ...], clear_base: str | None) -> None:
    """Make REF (or several, stacked) the active adapter(s) of its base."""
    if clear_base is not None:
        if refs:
            raise click.UsageError("give either REFs or --clear BASE, not both")
        registry.deactivate(clear_base)
        click.echo(f"{clear_base}: no active adapter")
        return
    if not refs:
        raise click.UsageError("give at least one REF (or --clear BASE)")
    base, active = registry.switch(*refs)
    click.echo(f"{base or '(no base)'}: active {', '.join(active)}")
