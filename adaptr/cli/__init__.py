"""The ``adaptr`` command line: thin commands over the library, one error table.

Every failure the user can fix prints one line ``error: …`` and exits non-zero; the
traceback appears only with ``--debug`` or ``ADAPTR_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

import adaptr
from adaptr.cli import (
    adapters,
    bases,
    check,
    compose,
    evaluate,
    plugins,
    remote,
    serve,
    store,
    train,
    ui,
)
from adaptr.errors import AdaptrError, InterruptedAfterStore, clip, shadowing_package


class AdaptrGroup(click.Group):
    """Built-in commands resolve at once; plugin commands are loaded only when needed."""

    _plugins_loaded = False

    @classmethod
    def forget_plugin_commands(cls) -> None:
        """Ask the plugins for their commands again at the next look-up (after registering
        one in code, as tests do)."""
        cls._plugins_loaded = False

    def _load_plugin_commands(self) -> None:
        if not AdaptrGroup._plugins_loaded:
            AdaptrGroup._plugins_loaded = True
            from adaptr.extend.manager import PLUGINS

            PLUGINS.call_each("adaptr_register_commands", cli=self)  # one that raises: a warning

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        cmd = super().get_command(ctx, name)
        if cmd is None:
            self._load_plugin_commands()
            cmd = super().get_command(ctx, name)
        return cmd

    def list_commands(self, ctx: click.Context) -> list[str]:
        self._load_plugin_commands()
        return super().list_commands(ctx)


@click.group(cls=AdaptrGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False),
    default=None,
    help="Registry home (default: $ADAPTR_HOME or ~/.adaptr).",
)
@click.option("--debug", is_flag=True, help="Show tracebacks on errors (or set ADAPTR_DEBUG=1).")
@click.version_option(getattr(adaptr, "__version__", "?"), prog_name="adaptr")
def cli(home: str | None, debug: bool) -> None:
    """adaptr: manage, train, compose and serve LoRA adapters.

    References: NAME (newest version), NAME@7 (version 7), NAME@prod (a tag).
    """


for command in (
    adapters.add, adapters.list_, adapters.show, adapters.switch, adapters.tag, adapters.rm,
    store.verify, store.gc, store.reindex, store.export, bases.base, plugins.plugins, plugins.families, plugins.formatters,
    train.train, compose.compose, compose.merge, compose.generate, serve.serve,
    evaluate.eval_, evaluate.compare, evaluate.curves, check.check,
    remote.copy_, ui.ui,
):  # fmt: skip
    cli.add_command(command)


MAX_MESSAGE = 2000  # a safety net: messages cut the values they echo far shorter


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args, debug = _debug_anywhere(sys.argv[1:] if argv is None else list(argv))
    debug = debug or os.environ.get("ADAPTR_DEBUG", "") not in ("", "0")
    if manager := sys.modules.get("adaptr.extend.manager"):  # loaded: plugins may have failed
        manager.PLUGINS.forget_warnings()  # each command reports every failure it meets, once
    if shadow := shadowing_package():
        return _fail(
            f"{shadow} is imported as the adaptr package instead of the installed one (a folder "
            "named adaptr in the current directory, first on sys.path for python -m and -c): "
            "run adaptr from another folder, or use the `adaptr` command",
            1,
            debug,
        )
    code = 0
    try:
        if args == ["--debug"] or not args:  # `adaptr` alone: the help, like git and uv
            with click.Context(cli, info_name="adaptr") as ctx:
                click.echo(cli.get_help(ctx))
            return 0
        rv = cli.main(args=args, prog_name="adaptr", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
        _warn_plugins()
    except AdaptrError as e:
        code = _fail(str(e), e.exit_code, debug)
    except click.UsageError as e:
        where = (
            f"adaptr {e.ctx.command_path.partition(' ')[2]} --help".replace("  ", " ")
            if e.ctx
            else "adaptr --help"
        )
        code = _fail(f"{e.format_message()} (see `{where.strip()}`)", 2, debug)
    except click.ClickException as e:
        code = _fail(e.format_message(), e.exit_code, debug)
    except (KeyboardInterrupt, click.Abort) as e:
        # after a version was stored (click's Abort wraps the KeyboardInterrupt it caught)
        stored = e if isinstance(e, InterruptedAfterStore) else e.__cause__
        if isinstance(stored, InterruptedAfterStore):
            code = _fail(str(stored), stored.exit_code, debug)
        else:
            code = _fail("interrupted; nothing was stored by the unfinished command", 130, debug)
    except OSError as e:
        what = f"{e.strerror or e}" + (f": {e.filename}" if e.filename else "")
        code = _fail(what, 1, debug)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception as e:  # a bug: still one line, with a way to see more
        code = _fail(
            f"internal error ({type(e).__name__}: {clip(e, 300)}); rerun with --debug for the traceback",
            1,
            debug,
        )
    return code


def _debug_anywhere(args: list[str]) -> tuple[list[str], bool]:
    """``--debug`` is a group option, but the error messages suggest adding it to a command
    line: it is taken anywhere before a ``--`` (moved to the front, where click reads it)."""
    cut = args.index("--") if "--" in args else len(args)
    if "--debug" not in args[:cut]:
        return args, False
    head = [a for a in args[:cut] if a != "--debug"]
    return ["--debug", *head, *args[cut:]], True


def _warn_plugins() -> None:
    """One stderr line per plugin failure this command met and did not report yet."""
    if manager := sys.modules.get("adaptr.extend.manager"):  # not loaded: no plugin failed
        for message in manager.PLUGINS.take_warnings():
            click.echo(f"warning: {message}", err=True)


def _fail(message: str, code: int, debug: bool) -> int:
    if debug:
        traceback.print_exc()
    _warn_plugins()  # before the error, which stays the last line
    click.echo(f"error: {clip(message, MAX_MESSAGE)}", err=True)
    return code


def run() -> None:
    sys.exit(main())
