"""Look-ups over what plugins registered: families by name or by model config, formatters by name.

``family_for(config)`` picks the family for a model (plugins may claim models first through
``adaptr_family_for_config``; one that raises there is a :class:`~adaptr.errors.PluginError`
naming it). A model that no family claims still trains with PEFT's own defaults.
"""

from __future__ import annotations

import difflib
from typing import Any

from adaptr.errors import InvalidInputError, brief
from adaptr.extend.manager import PLUGINS
from adaptr.extend.types import Formatter, ModelFamily


def families() -> dict[str, ModelFamily]:
    """Every registered family by name (loads plugins on first use)."""
    return PLUGINS.collect("adaptr_register_families", ModelFamily, "family")


def get_family(name: str) -> ModelFamily:
    fams = families()
    if name not in fams:
        why = PLUGINS.trouble("adaptr_register_families")
        if not fams:
            raise InvalidInputError(
                f"unknown family {brief(name)}: no family is registered ({why or 'no plugin registers one'})"
            )
        raise InvalidInputError(
            f"unknown family {brief(name)}: choose one of {', '.join(sorted(fams))} (see `adaptr families`)"
            + (f"; {why}" if why else "")
        )
    return fams[name]


def family_for(config: dict[str, Any] | Any) -> ModelFamily | None:
    """The family for a model config (dict or transformers config), or None if none claims it."""
    if not isinstance(config, dict):
        config = config.to_dict()
    fams = families()
    picked = PLUGINS.first_result(
        "adaptr_family_for_config", ModelFamily, config=config, families=fams
    )
    if picked is not None:
        return picked
    model_type = config.get("model_type")
    return next((f for f in fams.values() if model_type in f.model_types), None)


def formatters() -> dict[str, Formatter]:
    """Every registered formatter by name (loads plugins on first use)."""
    return PLUGINS.collect("adaptr_register_formatters", Formatter, "formatter")


def get_formatter(name: str) -> Formatter:
    fmts = formatters()
    if name not in fmts:
        why = PLUGINS.trouble("adaptr_register_formatters")  # the plugins that would have had it
        if not fmts:
            raise InvalidInputError(
                f"unknown format {brief(name)}: no formatter is registered ({why or 'no plugin registers one'})"
            )
        close = difflib.get_close_matches(name, list(fmts), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise InvalidInputError(
            f"unknown format {brief(name)}: {hint}choose one of {', '.join(sorted(fmts))}"
            + (f"; {why}" if why else "")
        )
    return fmts[name]
