"""`adaptr train`: SFT a LoRA/QLoRA adapter and store it in the registry."""

from __future__ import annotations

import click

from adaptr.cli._common import console, emit_json, format_option, key_values, note, with_registry
from adaptr.training.methods import METHODS
from adaptr.training.recipe import OVER_LENGTH, QUANTIZATION
from adaptr.values import DTYPES

# CLI flag -> recipe key; flags override the recipe file
FLAGS = {
    "base": "base.path", "data": "data.path", "format": "data.format", "name": "name",
    "eval_split": "data.eval_split", "eval_data": "data.eval_path", "limit": "data.limit",
    "quantization": "base.quantization", "dtype": "base.dtype", "family": "base.family",
    "targets": "lora.target_modules", "r": "lora.r", "alpha": "lora.lora_alpha", "dropout": "lora.lora_dropout",
    "rslora": "lora.use_rslora", "dora": "lora.use_dora",
    "epochs": "sft.num_train_epochs", "max_steps": "sft.max_steps", "lr": "sft.learning_rate",
    "batch_size": "sft.per_device_train_batch_size", "grad_accum": "sft.gradient_accumulation_steps",
    "max_length": "sft.max_length", "packing": "sft.packing", "seed": "sft.seed",
    "gradient_checkpointing": "sft.gradient_checkpointing", "parent": "from",
    "over_length": "data.over_length",
}  # fmt: skip


def _for_method(key: str, method: str) -> str:
    """A training flag's recipe key in the section of the recipe's method (sft.max_steps ->
    dpo.max_steps)."""
    return f"{method}.{key.removeprefix('sft.')}" if key.startswith("sft.") else key


@click.command()
@click.option(
    "--base", help="Base model: a model folder, a Hub id, or a name from `adaptr base list`."
)
@click.option("--data", type=click.Path(), help="Training data: .jsonl, .json, .csv or .parquet.")
@click.option("--format", help="Dataset formatter (see `adaptr formatters`).")
@click.option("--name", help="Adapter name; the result is its next version.")
@click.option(
    "--method",
    type=click.Choice(METHODS),
    help="sft (default), or preference tuning: dpo, orpo, kto (TRL's trainers; settings in the "
    "recipe section of that name, e.g. --set dpo.beta=0.2).",
)
@click.option(
    "--recipe",
    "recipe_file",
    type=click.Path(),
    help="Recipe YAML (base/data/lora/sft sections); flags override it.",
)
@format_option
@click.option("--eval-split", type=float, help="Fraction of the data held out for evaluation.")
@click.option("--eval-data", type=click.Path(), help="A separate evaluation file (same format).")
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N records.")
@click.option(
    "--quantization",
    type=click.Choice(QUANTIZATION),
    help="Load the base in 8-bit or 4-bit NF4 (QLoRA).",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    help="Base weights dtype.",
)
@click.option("--family", help="Model family to use instead of the one matched from config.json.")
@click.option(
    "--targets", help="LoRA targets: attention, all-linear, or module names (q_proj,v_proj)."
)
@click.option("--r", type=click.IntRange(min=1), help="LoRA rank.")
@click.option("--alpha", type=int, help="LoRA alpha.")
@click.option("--dropout", type=click.FloatRange(0, 1), help="LoRA dropout.")
@click.option("--rslora/--no-rslora", default=None, help="Rank-stabilised LoRA scaling.")
@click.option("--dora/--no-dora", default=None, help="Weight-decomposed LoRA (DoRA).")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Training epochs.")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop after N optimizer steps.")
@click.option("--lr", type=click.FloatRange(min=0), help="Learning rate.")
@click.option("--batch-size", type=click.IntRange(min=1), help="Per-device batch size.")
@click.option("--grad-accum", type=click.IntRange(min=1), help="Gradient accumulation steps.")
@click.option(
    "--max-length",
    type=click.IntRange(min=1),
    help="Maximum tokens per example (or packed sequence).",
)
@click.option(
    "--packing/--no-packing", default=None, help="Pack examples into full-length sequences."
)
@click.option(
    "--gradient-checkpointing/--no-gradient-checkpointing",
    default=None,
    help="Trade compute for memory.",
)
@click.option("--seed", type=int, help="Random seed (LoRA init, shuffling).")
@click.option(
    "--from",
    "parent",
    metavar="REF",
    help="Continue training an existing version (recorded as its parent).",
)
@click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable).")
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="SECTION.KEY=VALUE",
    help="Any recipe setting, e.g. sft.warmup_steps=0.1 (value parsed as YAML).",
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted run from its last checkpoint."
)
@click.option(
    "--restart", is_flag=True, help="Discard checkpoints of an interrupted run and start over."
)
@click.option("--keep-run", is_flag=True, help="Keep the run folder (checkpoints) after success.")
@click.option(
    "--over-length",
    type=click.Choice(OVER_LENGTH),
    help="Records longer than --max-length: cut them (default), leave them out, or stop.",
)
@click.option(
    "--preview",
    "preview_count",
    type=click.IntRange(min=1),
    is_flag=False,
    flag_value=3,
    default=None,
    metavar="[N]",
    help="Show N examples (default 3) as the model will see them, the text that carries loss "
    "highlighted, with token counts and what --max-length cuts; loads no weights, trains nothing.",
)
@click.option(
    "--json", "as_json", is_flag=True, help="With --preview: print it as one JSON document."
)
@with_registry
def train(
    registry, recipe_file, format_options, tags, settings, resume, restart, keep_run,
    preview_count, as_json, **flags,
) -> None:  # fmt: skip
    """Fine-tune a LoRA adapter with TRL's SFTTrainer and store it as NAME's next version."""
    from adaptr.training.recipe import Recipe
    from adaptr.training.trainer import train as run_training

    recipe = Recipe.from_yaml(recipe_file) if recipe_file else Recipe()
    if method := flags.pop("method", None):
        recipe.set("method", method)
    for key, value in flags.items():
        if value is not None:
            recipe.set(_for_method(FLAGS[key], recipe.method), value)
    if flags.get("targets") and "," in flags["targets"]:
        recipe.set(
            "lora.target_modules", [t.strip() for t in flags["targets"].split(",") if t.strip()]
        )
    if format_options:
        options = key_values(format_options, "--format-option")
        recipe.data.options = {**(recipe.data.options or {}), **options}
    for key, value in key_values(settings, "--set", "SECTION.KEY=VALUE").items():
        recipe.set(key, value)
    if tags:
        recipe.tags = [*recipe.tags, *tags]
    if as_json and preview_count is None:
        raise click.UsageError("--json goes with --preview (training prints its result line)")
    if preview_count is not None:
        from adaptr.training.preview import preview

        shown = preview(recipe, registry=registry, count=preview_count)
        if as_json:
            emit_json(shown.to_dict())
        elif hasattr(shown, "method"):
            show_pair_preview(shown)
        else:
            show_preview(shown)
        return
    result = run_training(
        recipe, registry=registry, resume=resume, restart=restart, keep_run=keep_run, on_note=note
    )
    if result.version is None:
        return  # a non-main process of a distributed run
    m = result.metrics
    summary = [f"train loss {m['train_loss']:.4f}"]
    if "perplexity" in m:
        summary.append(f"eval loss {m['eval_loss']:.4f}, perplexity {m['perplexity']:.2f}")
    elif "eval_loss" in m:
        summary.append(f"eval loss {m['eval_loss']:.4f}")
    if "reward_accuracy" in m:
        summary.append(
            f"reward accuracy {m['reward_accuracy']:.2f}, margin {m.get('reward_margin', 0.0):.3f}"
        )
    if "tokens_per_second" in m:
        summary.append(f"{m['tokens_per_second']:.0f} tokens/s")
    click.echo(
        f"{result.version.ref}  ({'; '.join(summary)}; {m['steps']} steps in {m['duration_s']:.1f}s)"
    )


def show_preview(shown) -> None:
    """Examples with the loss-carrying text highlighted (or between ⟦ ⟧ when not a terminal)."""
    from rich.text import Text

    out = console()
    color = out.is_terminal
    if color:
        out.print(Text("text in green carries loss; dim text is context only", style="italic"))
    else:
        out.print("text between ⟦ and ⟧ carries loss; the rest is context only")
    for ex in shown.examples:
        status = "  DROPPED" if ex.dropped else ""
        out.print(
            Text(
                f"── record {ex.record} ({ex.split}): {ex.tokens:,} tokens, {ex.loss_tokens:,} carry loss{status}",
                style="bold",
            )
        )
        body = Text()
        for seg in ex.segments:
            if color:
                body.append(seg.text, style="bold green" if seg.loss else "dim")
            else:
                body.append(f"⟦{seg.text}⟧" if seg.loss else seg.text)
        out.print(body)
        if ex.cut_tokens:
            out.print(
                Text(
                    f"✂ max_length cuts {ex.cut_tokens:,} tokens from its {ex.cut_side}",
                    style="yellow",
                )
            )
    for r in shown.reports:
        share = f" ({100 * r.loss_tokens / r.tokens:.0f}%)" if r.tokens else ""
        out.print(
            f"{r.split}: {r.kept:,} of {r.records:,} records train, {r.tokens:,} tokens, "
            f"{r.loss_tokens:,} carry loss{share}; longest {r.longest:,} (max_length {r.max_length})"
        )
    out.print(f"loss on: {shown.loss}")
    for line in shown.notes:
        note(line)


def show_pair_preview(shown) -> None:
    """Preference records: the prompt, then the answers side by side (all of their tokens
    carry loss; the prompt is context)."""
    from rich.table import Table
    from rich.text import Text

    out = console()
    out.print(f"{shown.method}: loss on {shown.loss}")
    for ex in shown.examples:
        label = "" if ex.label is None else f", label {'desirable' if ex.label else 'undesirable'}"
        status = "  DROPPED" if ex.dropped else ""
        out.print(
            Text(
                f"── record {ex.record} ({ex.split}): {ex.tokens:,} tokens (prompt + longest answer), "
                f"{ex.loss_tokens:,} carry loss{label}{status}",
                style="bold",
            )
        )
        out.print(Text("prompt (context): ", style="italic") + Text(ex.prompt, style="dim"))
        table = Table(*ex.answers, show_lines=False, expand=True)
        table.add_row(*(Text(t, style="green" if out.is_terminal else "") for t in ex.answers.values()))
        out.print(table)
        if ex.cut_tokens:
            out.print(Text(f"✂ max_length cuts {ex.cut_tokens:,} tokens", style="yellow"))
    for r in shown.reports:
        out.print(
            f"{r.split}: {r.kept:,} of {r.records:,} records train, {r.tokens:,} tokens, "
            f"{r.loss_tokens:,} carry loss; longest {r.longest:,} (max_length {r.max_length})"
        )
    for line in shown.notes:
        note(line)
