"""Docs check: every `adaptr …` command in the README parses against the real CLI, and the
README's two fresh-machine commands are the ones CI runs."""

import re
import shlex
import warnings
from pathlib import Path

import click
import pytest

from adaptr.cli import cli

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```console\n(.*?)```", README, re.S):
        lines = block.replace("\\\n", " ").splitlines()
        for line in lines:
            if line.startswith("$ "):
                for part in line[2:].split(" && "):
                    part = re.split(r"\s{2,}#", part)[0].strip()
                    if part.startswith("adaptr"):
                        commands.append(part)
    return commands


COMMANDS = readme_commands()


def test_the_readme_shows_the_cli():
    used = {shlex.split(c)[1] for c in COMMANDS}
    assert {
        "add",
        "list",
        "show",
        "switch",
        "tag",
        "rm",
        "verify",
        "gc",
        "export",
        "train",
        "compose",
        "merge",
        "generate",
        "serve",
        "base",
        "families",
    } <= used


def _unparsed(ctx: click.Context) -> list[str]:
    """Tokens left for subcommands (Click < 9 splits them into protected_args + args)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        protected = getattr(ctx, "protected_args", [])
    return [*protected, *ctx.args]


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    args = shlex.split(command)[1:]
    ctx = cli.make_context("adaptr", list(args), resilient_parsing=False)
    group, rest = cli, _unparsed(ctx)
    while isinstance(group, click.Group):
        name, cmd, rest = group.resolve_command(ctx, rest)
        assert cmd is not None, f"unknown command in README: {command}"
        ctx = cmd.make_context(name, list(rest), parent=ctx)
        group, rest = cmd, _unparsed(ctx) if isinstance(cmd, click.Group) else []


def test_the_two_fresh_machine_commands_match_ci():
    demo = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e . && python examples/demo.py"
    tests = "python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e '.[test]' && python -m pytest -q"
    assert demo in README and tests in README
    ci = (ROOT / ".ci" / "run").read_text()
    for step in (
        "python3 -m venv .venv",
        ". .venv/bin/activate",
        "pip install -q torch==2.13.0",
        "pip install -q -e '.[test]'",
        "python -m pytest -q",
    ):
        assert step in ci, step
