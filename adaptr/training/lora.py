"""Build a ``peft.LoraConfig`` for a model from its family's presets and defaults.

Precedence: explicit overrides > family ``lora_defaults`` > PEFT's defaults. Targets are a
family preset ('attention', 'all-linear') or an explicit list, checked against the model.
"""

from __future__ import annotations

import warnings
from typing import Any

from adaptr.errors import InvalidInputError, first_line
from adaptr.extend.catalog import family_for
from adaptr.extend.types import ModelFamily


class AdaptrWarning(UserWarning):
    """Something adaptr worked around and the user should know (shown as `warning: …`)."""


def linear_modules(model) -> list[str]:
    """Full names of the model's LoRA-able layers (Linear / GPT-2 Conv1D), lm_head excluded."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, (torch.nn.Linear, Conv1D)) and not n.endswith("lm_head")
    ]


def linear_module_names(model) -> list[str]:
    """Short names of the model's LoRA-able layers, for messages."""
    return sorted({n.split(".")[-1] for n in linear_modules(model)})


def _present(target: str, modules: list[str]) -> bool:
    """PEFT's list rule: a target matches a module name exactly or as a dotted suffix."""
    return any(m == target or m.endswith("." + target) for m in modules)


def resolve_targets(
    model, family: ModelFamily | None, targets: str | list[str] | None
) -> list[str] | str | None:
    """Turn a preset name or a list into target_modules, refusing modules the model lacks."""
    modules = linear_modules(model)
    if isinstance(targets, str) and "," in targets:
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if isinstance(targets, list):
        missing = [t for t in targets if not _present(t, modules)]
        if missing:
            raise InvalidInputError(
                f"the model has no module {missing[0]!r}; its linear layers are: {', '.join(linear_module_names(model))}"
            )
        return targets
    preset = targets or "attention"
    if family is None:
        return (
            "all-linear" if preset == "all-linear" else None
        )  # None: PEFT's per-model_type defaults
    chosen = family.targets(preset)
    if isinstance(chosen, list):
        chosen = [
            t for t in chosen if _present(t, modules)
        ]  # a family may cover variants (MLA, LLaMA)
        if not chosen:
            raise InvalidInputError(
                f"none of family {family.name}'s {preset} targets exist in this model; "
                f"its linear layers are: {', '.join(linear_module_names(model))}"
            )
    return chosen


def lora_config(
    model,
    *,
    family: ModelFamily | str | None = None,
    targets: str | list[str] | None = None,
    **overrides: Any,
):
    """A LoraConfig for ``model`` (family found from its config unless given); returns (config, family)."""
    from peft import LoraConfig

    if isinstance(family, str):
        from adaptr.extend.catalog import get_family

        family = get_family(family)
    if family is None:
        family = family_for(model.config)
    if family is None:
        warnings.warn(
            f"no family claims model_type {model.config.model_type!r}: using PEFT's default LoRA targets; "
            "install a plugin for it or pass target modules explicitly",
            AdaptrWarning,
            stacklevel=2,
        )
    kwargs = {"task_type": "CAUSAL_LM", **(family.lora_defaults if family else {}), **overrides}
    kwargs["target_modules"] = resolve_targets(model, family, targets)
    try:
        return LoraConfig(**kwargs), family
    except (TypeError, ValueError) as e:  # LoraConfig's own checks (e.g. use_dora with a bias)
        raise InvalidInputError(f"invalid LoRA setting: {first_line(e)}") from None
