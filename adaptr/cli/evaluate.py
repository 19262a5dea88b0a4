"""Evaluation commands: eval (score and store), compare (versions x metrics), curves."""

from __future__ import annotations

from pathlib import Path

import click

from adaptr.cli._common import (
    emit_json,
    format_option,
    json_option,
    key_values,
    note,
    wide_option,
    with_registry,
)
from adaptr.cli.table import print_table


def _fmt(value) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


@click.command("eval")
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "--data",
    required=True,
    type=click.Path(dir_okay=False),
    help="Data file (JSONL, JSON, CSV, …).",
)
@click.option("--format", "fmt", required=True, help="Data format (see `adaptr formatters`).")
@click.option(
    "--metrics",
    default="loss,ppl",
    show_default=True,
    help="Comma-separated: loss, ppl, exact, chrf, bleu, rougeL (these four generate); pref "
    "(pref_acc, pref_margin) on preference pairs.",
)
@format_option
@click.option("--base-line", is_flag=True, help="Score the bare base too (shown, not stored).")
@click.option(
    "--max-new-tokens",
    default=64,
    show_default=True,
    type=int,
    help="Greedy tokens per generation.",
)
@click.option(
    "--batch-size",
    default=8,
    show_default=True,
    type=int,
    help="Records per batch (each runs once per ref).",
)
@click.option("--limit", type=int, default=None, help="Only the first N records.")
@click.option("--no-store", is_flag=True, help="Show the scores without storing them.")
@click.option(
    "--bleu-tokenize",
    default="auto",
    show_default=True,
    metavar="TOK",
    help="sacrebleu's tokenizer for BLEU: 13a, intl, zh, char, none, or ja-mecab, ko-mecab, "
    "flores200… where installed. auto: zh when the references are mostly Chinese (ja-mecab "
    "or char Japanese, ko-mecab or 13a Korean), else 13a. Stored in the settings and "
    "sacrebleu's signature (tok:); BLEU with different tokenizers is never compared.",
)
@json_option
@wide_option
@with_registry
def eval_(
    registry, refs, data, fmt, format_options, metrics, base_line, max_new_tokens, batch_size, limit, no_store,
    bleu_tokenize, as_json, wide,
) -> None:  # fmt: skip
    """Score versions of one base on DATA in one mixed pass; results are stored on each version."""
    from adaptr.evaluation.run import evaluate
    from adaptr.runtime import quiet_libraries

    options = key_values(format_options, "--format-option")
    quiet_libraries()
    with _Progress() as bar:
        result = evaluate(
            refs, data, fmt, metrics, registry=registry, base_line=base_line,
            max_new_tokens=max_new_tokens, batch_size=batch_size, limit=limit,
            store=not no_store, progress=bar.update, options=options,
            bleu_tokenize=bleu_tokenize,
        )  # fmt: skip
    if as_json:
        emit_json(result.to_dict())
        return
    for line in result.notes:
        note(line)
    names = list(next(iter(result.scores.values())))
    print_table(
        ("REF", *[n.upper() for n in names]),
        [(ref or "(base)", *[_fmt(m[n]) for n in names]) for ref, m in result.scores.items()],
        right=tuple(n.upper() for n in names),
        wide=wide,
    )
    ds = result.dataset
    click.echo(f"data: {ds['path']} ({ds['records']} records, sha256 {ds['sha256'][:12]})")
    for name, sig in result.signatures.items():
        click.echo(f"{name}: {sig}")
    if result.records:
        click.echo(f"stored on {', '.join(str(r.ref) for r in result.records)}")


class _Progress:
    """A rich progress bar on stderr (stdout keeps the result), one task per stage."""

    def __enter__(self):
        self.progress = None  # started on the first update: a refusal before it prints nothing
        self.tasks: dict[str, int] = {}
        return self

    def update(self, stage: str, done: int, total: int) -> None:
        if self.progress is None:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), console=Console(stderr=True), transient=True,
            )  # fmt: skip
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done)

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "--data", type=click.Path(dir_okay=False), help="Evals on this file only (by SHA-256)."
)
@json_option
@wide_option
@with_registry
def compare(registry, refs, data, as_json, wide) -> None:
    """Versions x metrics: training metrics and stored evals on one dataset; * marks the best."""
    from adaptr.evaluation.compare import compare as compare_
    from adaptr.evaluation.metrics import LOWER_IS_BETTER

    doc = compare_(registry, refs, data)
    if as_json:
        emit_json(doc)
        return
    cols = doc["columns"]
    rows = []
    for r in doc["rows"]:
        cells = [r["ref"] + (f" ({', '.join(r['tags'])})" if r["tags"] else "")]
        for c in cols:
            mark = "*" if r["ref"] in doc["best"].get(c, ()) else " "
            cells.append(_fmt(r["metrics"].get(c)) + mark)
        rows.append(cells)
    print_table(("VERSION", *cols), rows, right=tuple(cols), wide=wide)
    split = sorted({c.split("[")[0] for c in cols if "[" in c})
    if split:
        click.echo(
            f"{', '.join(split)}: measured with different settings, one column each (values "
            "in different columns are not comparable)"
        )
    lower = [c for c in cols if c.split("[")[0] in LOWER_IS_BETTER]
    arrows = (
        f"lower is better for {', '.join(lower)}, higher for the rest"
        if lower
        else "higher is better"
    )
    if doc["dataset"]:
        ds = doc["dataset"]
        click.echo(f"evals on {ds['path']} (sha256 {ds['sha256'][:12]})\n* best: {arrows}")
    elif data:
        note("no stored eval on that data: run `adaptr eval REF... --data FILE --format FMT`")
    else:
        click.echo(f"no stored evals\n* best: {arrows}" if cols else "no metrics stored")
    if doc.get("other_datasets"):
        names = ", ".join(Path(d.get("path", "?")).name for d in doc["other_datasets"])
        note(f"also evaluated on {names}: `--data FILE` shows those")


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "--png",
    type=click.Path(dir_okay=False),
    help="Also draw the curves into this PNG (needs matplotlib).",
)
@click.option(
    "--parents", is_flag=True, help="Add each version's parent(s) (what it continued from)."
)
@json_option
@with_registry
def curves(registry, refs, png, parents, as_json) -> None:
    """Training loss curves of versions (stored log history): a terminal chart, a PNG."""
    from adaptr.evaluation.compare import curves as curves_

    if parents:
        wanted: list[str] = []
        for ref in refs:
            v = registry.get(ref)
            for r in (v.ref, *(v.lineage.get("parents") or [])):
                if r not in wanted:
                    wanted.append(r)
        refs = tuple(wanted)
    from adaptr.cli.charts import plot_curves, sparkline

    series = curves_(registry, refs)
    if png:
        plot_curves(series, png)
    if as_json:
        emit_json({"curves": series, "png": png})
        return
    for ref, s in series.items():
        for key in ("loss", "eval_loss"):
            points = s[key]
            if not points:
                continue
            values = [v for _, v in points]
            click.echo(
                f"{ref:<16} {key:<9} {sparkline(values)}  {values[0]:.4f} -> {values[-1]:.4f} "
                f"(min {min(values):.4f}, {len(values)} point(s), last step {points[-1][0]})"
            )
    if png:
        click.echo(f"wrote {png}")
