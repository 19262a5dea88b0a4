"""The hooks a plugin can implement. Each is documented in README's "Writing a plugin".

A plugin is a module (or object) with functions decorated ``@adaptr.hookimpl`` whose names
and arguments match the specs below, exposed through the ``adaptr`` entry-point group::

    [project.entry-points.adaptr]
    my_plugin = "my_package.plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import click

    from adaptr.extend.types import Formatter, ModelFamily
    from adaptr.registry import AdapterVersion, Registry

hookspec = pluggy.HookspecMarker("adaptr")
hookimpl = pluggy.HookimplMarker("adaptr")


@hookspec
def adaptr_register_families(register: Callable[[ModelFamily], None]) -> None:
    """Register model families: call ``register(ModelFamily(...))`` once per family.

    A family names the ``model_types`` it covers (as in a model's config.json) and what
    differs per architecture: LoRA target-module presets, LoRA defaults, tokenizer
    fix-ups, a chat template and tiny configs for smoke tests.
    """


@hookspec
def adaptr_register_formatters(register: Callable[[Formatter], None]) -> None:
    """Register dataset formatters: call ``register(Formatter(...))`` once per formatter.

    A formatter turns one raw record into a TRL record (``text``, ``prompt``/``completion``
    or ``messages``). A plugin whose register hook raises adds nothing and is skipped with
    a warning naming it (this holds for ``adaptr_register_families`` too).
    """


@hookspec(firstresult=True)
def adaptr_family_for_config(
    config: dict[str, Any], families: dict[str, ModelFamily]
) -> ModelFamily | None:
    """Pick the family for a model config (a config.json dict); the first non-None answer wins.

    Implement it to claim models that ``model_types`` alone cannot tell apart (DeepSeek's
    LLaMA-architecture models say ``"model_type": "llama"``). Return None to pass.
    Mark the implementation ``tryfirst=True`` to run before the built-in look-up.
    An exception here (or an answer that is not a ModelFamily) refuses the command with one
    line naming the plugin and this hook (:class:`adaptr.errors.PluginError`); raise an
    :class:`adaptr.AdaptrError` to give the user a message of your own.
    """


@hookspec
def adaptr_register_commands(cli: click.Group) -> None:
    """Add commands to the ``adaptr`` CLI: ``cli.add_command(my_click_command)``.

    Called only when a command that is not built in is looked up, or for ``adaptr --help``,
    so plugins never slow down the built-in commands. One that raises is skipped with a
    warning naming it; the other commands stay.
    """


@hookspec
def adaptr_version_added(registry: Registry, version: AdapterVersion) -> None:
    """Called after a new adapter version is committed to a registry (by add, train, compose).

    The version is already stored: an exception here (``sys.exit`` included) is reported,
    not undone, and the other plugins still hear the event. Ctrl-C stops the command with
    :class:`adaptr.errors.InterruptedAfterStore`, which says that the version is stored.
    """
