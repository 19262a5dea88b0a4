"""`adaptr compose`, `adaptr merge`, `adaptr generate`."""

from __future__ import annotations

import click

from adaptr.cli._common import emit_json, json_option, with_registry
from adaptr.errors import brief
from adaptr.values import DTYPES


def _weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(w) for w in text.split(",") if w.strip()]
    except ValueError:
        weights = []
    if not weights:  # finite values are compose()'s to check
        raise click.UsageError(f"--weights takes numbers separated by commas, got {brief(text)}")
    return weights


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option("--weights", help="One weight per adapter, comma-separated (default 1 each).")
@click.option(
    "--method",
    default="linear",
    show_default=True,
    help="linear, cat, svd, ties, dare_linear, dare_ties or magnitude_prune.",
)
@click.option(
    "--name", required=True, help="Name of the composed adapter (its next version is created)."
)
@click.option(
    "--density", type=float, help="Fraction of weights kept (ties, dare_*, magnitude_prune)."
)
@click.option(
    "--majority-sign-method",
    type=click.Choice(["total", "frequency"]),
    default="total",
    show_default=True,
    help="Sign election (ties, dare_ties).",
)
@click.option(
    "--svd-rank",
    type=click.IntRange(min=1),
    help="Rank of the svd result (default: the largest input rank).",
)
@click.option("--base", help="Base model folder, if the adapters' recorded base is not reachable.")
@click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable).")
@with_registry
def compose(
    registry, refs, weights, method, name, density, majority_sign_method, svd_rank, base, tags
) -> None:
    """Combine adapters (PEFT add_weighted_adapter) into a new registered version."""
    from adaptr.compose import compose as run
    from adaptr.registry.atomic import exit_on_sigterm
    from adaptr.runtime import quiet_libraries

    quiet_libraries()
    with exit_on_sigterm():  # its work folder is removed on the way out
        v = run(registry, refs, _weights(weights, len(refs)), method, name, density=density,
                majority_sign_method=majority_sign_method, svd_rank=svd_rank, base=base, tags=tags)  # fmt: skip
    click.echo(v.ref)


@click.command()
@click.argument("refs", nargs=-1, required=True)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Output folder for the standalone model.",
)
@click.option("--base", help="Base model folder (default: the adapters' registered base).")
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="Precision of the merged weights.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@json_option
@with_registry
def merge(registry, refs, out, base, dtype, force, as_json) -> None:
    """Merge REF(s) into the base: a model folder AutoModelForCausalLM loads without PEFT."""
    from adaptr.merge import merge as run
    from adaptr.registry.atomic import exit_on_sigterm
    from adaptr.runtime import quiet_libraries

    quiet_libraries()
    with exit_on_sigterm():
        record = run(registry, refs, out, base=base, dtype=dtype, force=force)
    if as_json:
        emit_json({"out": out, **record.to_dict()})
        return
    click.echo(
        f"{out}  ({', '.join(record.refs)} merged into {record.base}, {record.dtype}; {record.path})"
    )


@click.command()
@click.argument("args", nargs=-1, required=True, metavar="[REF] PROMPT")
@click.option(
    "--stack",
    "stacked",
    multiple=True,
    metavar="REF",
    help="Another adapter active at the same time (repeatable).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    default=32,
    show_default=True,
    help="Most tokens to generate (greedy decoding; stops earlier at EOS).",
)
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--base", help="Base model folder, if the recorded base is not reachable.")
@json_option
@with_registry
def generate(registry, args, stacked, max_new_tokens, chat, base, as_json) -> None:
    """Generate with REF (default: the active adapter(s)); --stack adds more, all active at once."""
    from adaptr import inference
    from adaptr.registry.atomic import exit_on_sigterm
    from adaptr.runtime import quiet_libraries

    quiet_libraries()
    if len(args) > 2:
        raise click.UsageError(
            "give at most one REF and one PROMPT (quote the prompt); stack more adapters with --stack"
        )
    prompt = args[-1]
    refs = ([args[0]] if len(args) == 2 else []) + list(stacked)
    with exit_on_sigterm():  # the adapters' temporary folder is removed on the way out
        model, tokenizer, names = inference.load(registry, refs or None, base=base)
        text = inference.generate(
            model, tokenizer, prompt, max_new_tokens=max_new_tokens, chat=chat
        )
    if as_json:
        emit_json({"adapters": names, "prompt": prompt, "completion": text})
    else:
        click.echo(text)
