"""The first five minutes: help where a newcomer looks for it, messages that say where."""

from __future__ import annotations

import subprocess
import sys

import click

from adaptr.cli import cli as root


def commands(cmd: click.Command = root, path: tuple[str, ...] = ("adaptr",)):
    """Every command and sub-command, with its path."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            yield from commands(cmd.get_command(ctx, name), (*path, name))


def test_adaptr_alone_prints_the_help_and_succeeds(cli):
    code, out, err = cli()
    assert code == 0 and err == ""
    assert out.startswith("Usage: adaptr [OPTIONS] COMMAND [ARGS]...")
    assert "Commands:" in out and "  train " in out and "error:" not in out
    # the installed script too, as a user types it
    done = subprocess.run(
        [sys.executable, "-c", "from adaptr.cli import run; run()"], capture_output=True, text=True, timeout=120
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("Usage: adaptr") and not done.stderr


def test_every_command_and_option_has_help():
    missing = []
    for path, cmd in commands():
        if not (cmd.help or cmd.short_help):
            missing.append(" ".join(path))
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.help:
                missing.append(f"{' '.join(path)} {p.opts[0]}")
    assert missing == []


def test_port_out_of_range_is_refused(cli):
    code, _, err = cli("serve", "--base", "tiny", "--port", "70000")
    assert code == 2 and "'--port': 70000 is not in the range 1<=x<=65535" in err
