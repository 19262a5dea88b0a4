"""The first five minutes: help where a newcomer looks for it, messages that say where."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from adaptr.cli import cli as root
from adaptr.registry import Registry


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


def widest(text: str) -> int:
    from rich.cells import cell_len

    return max(cell_len(line) for line in text.splitlines())


@pytest.mark.parametrize("command", [("families",), ("formatters",), ("plugins",)])
def test_tables_fit_80_columns_and_wide_shows_all(cli, monkeypatch, command):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = cli(*command)
    assert code == 0, err
    assert widest(out) <= 80
    code, wide, _ = cli(*command, "--wide")
    assert code == 0 and widest(wide) >= widest(out)
    if command == ("families",):
        assert "kv_a_proj_with_mqa, kv_b_proj, o_proj, gate_proj" in wide  # one line, whole
        assert "lora defaults: r=16, lora_alpha=32, lora_dropout=0.05" in out  # moved below
    if command == ("formatters",):
        assert "description: Plain language modelling" in out
        assert "    description:" not in wide  # a column of its own when wide


def test_list_fits_80_columns_keeping_names_and_path_ends(cli, registry, tmp_path, monkeypatch):
    from helpers import write_adapter

    monkeypatch.setenv("COLUMNS", "80")
    deep = "a-very-long-organisation-name/a-long-model-name-for-testing-base-folder"
    name = "customer-support-intent-classifier"
    for seed, tag in enumerate(("prod", "staging", "canary-2026-11")):
        registry.add(name, write_adapter(tmp_path / tag, base=deep, seed=seed), tags=[tag])
    code, out, err = cli("list")
    assert code == 0, err
    assert widest(out) <= 80
    header, row = out.splitlines()[:2]
    heads = ["NAME", "VERSIONS", "BASE", "TYPE", "RANK", "SIZE", "TAGS", "ACTIVE", "CREATED"]
    assert header.split() == heads
    lines = out.splitlines()[1:]
    assert "".join(line[:16].strip() for line in lines) == name  # wrapped in its cell, not cut
    assert row[16:].split()[0] == "@1-3"
    assert " …older " in row  # the base keeps its end
    code, wide, _ = cli("list", "--wide")
    assert deep in wide and "prod@1, staging@2, canary-2026-11" in wide
    code, doc, _ = cli("list", "--json")
    assert deep in doc  # JSON is never cut


def test_read_commands_name_the_home_and_create_nothing(cli, tmp_path):
    home = tmp_path / "nowhere"
    code, out, err = cli("--home", str(home), "list")
    assert code == 0 and out.startswith(
        f"no registry at {home.resolve()} (nothing was created there)"
    )
    code, out, err = cli("--home", str(home), "verify")
    assert code == 3 and err.startswith(f"error: no registry at {home.resolve()}")
    code, out, err = cli("--home", str(home), "base", "list")
    assert code == 0 and f"in {home.resolve()}" in out
    assert not home.exists()
    home.mkdir()
    code, out, err = cli("--home", str(home), "list")
    assert code == 0 and out.startswith(f"no adapters yet in {home.resolve()}: add one with")


def test_unknown_adapter_names_the_home_it_looked_in(cli, registry, adapter_dir, tmp_path):
    home = registry.home.resolve()
    code, _, err = cli("show", "ghost")
    assert code == 3 and err.startswith(
        f"error: unknown adapter 'ghost' in {home}: there is no registry there"
    )
    registry.add("legal", adapter_dir)
    code, _, err = cli("show", "ghost")
    assert err.startswith(f"error: unknown adapter 'ghost' in {home}: run `adaptr list`")
    code, _, err = cli("show", "legl")
    assert err.startswith(f"error: unknown adapter 'legl' in {home}: did you mean 'legal'?")


@pytest.mark.parametrize(
    "args, message",
    [
        (("train", "--format-option", "lang"), "--format-option takes KEY=VALUE, got 'lang'"),
        (("train", "--set", "sft.seed"), "--set takes SECTION.KEY=VALUE, got 'sft.seed'"),
        (("eval", "x", "--data", "d.jsonl", "--format", "text", "--format-option", "field"),
         "--format-option takes KEY=VALUE, got 'field'"),
    ],
)  # fmt: skip
def test_key_value_flags_without_a_value_are_usage_errors(cli, home, args, message):
    code, out, err = cli(*args)
    assert code == 2 and out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not home.exists()  # nothing stored, no registry made


def test_an_internal_error_is_still_one_short_line(cli, home, populated, monkeypatch):
    def boom(self, name=None):
        raise RuntimeError("size mismatch " * 1000)

    monkeypatch.setattr(Registry, "list", boom)
    code, out, err = cli("list")
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1, err[:500]
    assert lines[0].startswith("error: internal error (RuntimeError: size mismatch size mismatch")
    assert lines[0].endswith("rerun with --debug for the traceback") and len(lines[0]) < 400
