"""`adaptr check`: what an engine would refuse, said before deploying."""

from __future__ import annotations

import click

from adaptr.cli._common import emit_json, json_option, with_registry


@click.command()
@click.argument("ref")
@click.option(
    "--engine",
    type=click.Choice(["vllm"]),
    default="vllm",
    show_default=True,
    help="The engine to check against.",
)
@click.option(
    "--base",
    default=None,
    help="Registered base the server will run (its name, or the folder or GGUF file it was "
    "registered from); the version must have been made for it.",
)
@click.option(
    "--max-lora-rank",
    type=click.IntRange(min=1),
    default=None,
    help="The server's --max-lora-rank (default: not checked; the needed value is printed).",
)
@json_option
@with_registry
def check(
    registry, ref: str, engine: str, base: str | None, max_lora_rank: int | None, as_json: bool
) -> int:
    """Check that ENGINE can serve REF: exit 0 if it can, else name every reason."""
    from adaptr.errors import InvalidAdapterError
    from adaptr.serving.vllm.compat import lora_rank_setting, max_rank, version_problems
    from adaptr.serving.vllm.source import Refused, RegistrySource

    v = registry.get(ref)
    problems = []
    if base is not None:
        from adaptr.bases import registered_base

        base = registered_base(registry, base, use="vLLM")
        source = RegistrySource(registry.home, base=base)
        try:
            source.check_base(v)
        except Refused as e:
            problems.append(str(e))
    problems += version_problems(registry, v, max_lora_rank=max_lora_rank)
    served = base or v.base
    if served:  # what the installed vLLM cannot run of the base itself
        from adaptr.serving.vllm.launch import head_size_problem

        problems += filter(None, [head_size_problem(registry, served)])
    rank = max_rank(v.config)
    if as_json:
        emit_json(
            {"ref": v.ref, "engine": engine, "ok": not problems, "problems": problems,
             "rank": rank, "max_lora_rank": lora_rank_setting(rank)}
        )  # fmt: skip
        return 1 if problems else 0
    if problems:
        raise InvalidAdapterError(f"vLLM cannot serve {v.ref}: {'; '.join(problems)}")
    click.echo(
        f"{v.ref}: vLLM can serve it (rank {rank}: --max-lora-rank {lora_rank_setting(rank)} or more)"
    )
    return 0
