"""Model families: what differs per architecture, contributed by plugins.

``families()`` collects every registered :class:`ModelFamily`; ``family_for(config)`` picks
the one for a model (plugins may claim models first through ``adaptr_family_for_config``;
one that raises there is a :class:`~adaptr.errors.PluginError` naming it).
A model that no family claims still trains with PEFT's own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import AdaptrError, InvalidInputError, brief

PRESETS = ("attention", "all-linear")


@dataclass
class ModelFamily:
    """One architecture family (e.g. LLaMA covers llama and mistral)."""

    name: str = field(metadata={"help": "Short unique name, e.g. 'llama'."})
    model_types: list[str] = field(
        metadata={"help": "config.json model_type values this family covers."}
    )
    target_modules: list[str] | dict[str, list[str] | str] = field(
        metadata={
            "help": "LoRA targets: a list (the 'attention' preset) or presets {'attention': [...], 'all-linear': [...]}."
        }
    )
    lora_defaults: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "LoraConfig defaults (r, lora_alpha, fan_in_fan_out…)."},
    )
    pad_token: str | None = field(
        default=None,
        metadata={"help": "'eos': use the EOS token for padding when the tokenizer has none."},
    )
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template for tokenizers that lack one."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Plain prompt layout with {prompt}, for base (non-chat) models."},
    )
    tiny_configs: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "model_type -> small config kwargs for smoke tests."},
    )
    description: str = ""
    plugin: str | None = field(
        default=None, metadata={"help": "Set by adaptr: the plugin that registered it."}
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = {"attention": list(self.target_modules)}
        self.target_modules = dict(self.target_modules)
        self.target_modules.setdefault("all-linear", "all-linear")
        if not self.model_types:
            raise InvalidInputError(f"family {self.name!r} names no model_types")

    def targets(self, preset: str = "attention") -> list[str] | str:
        """Target modules for a preset ('attention' or 'all-linear')."""
        if preset not in self.target_modules:
            raise InvalidInputError(
                f"family {self.name} has no target preset {preset!r}: choose {', '.join(self.target_modules)} or list module names"
            )
        value = self.target_modules[preset]
        return list(value) if isinstance(value, (list, tuple)) else value

    def fix_tokenizer(self, tokenizer) -> None:
        """Apply the family's tokenizer fix-ups in place (pad token, chat template)."""
        if tokenizer.pad_token is None and self.pad_token == "eos":
            tokenizer.pad_token = tokenizer.eos_token
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = self.chat_template

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model_types": self.model_types, "target_modules": self.target_modules,
            "lora_defaults": self.lora_defaults, "pad_token": self.pad_token,
            "chat_template": self.chat_template is not None, "tiny_configs": sorted(self.tiny_configs),
            "description": self.description, "plugin": self.plugin,
        }  # fmt: skip


def families() -> dict[str, ModelFamily]:
    """Every registered family by name (loads plugins on first use)."""
    from .plugin_manager import collect

    return collect("adaptr_register_families", ModelFamily, "family")


def get_family(name: str) -> ModelFamily:
    from .plugin_manager import trouble

    fams = families()
    if name not in fams:
        why = trouble("adaptr_register_families")
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
    from .plugin_manager import first_result

    if not isinstance(config, dict):
        config = config.to_dict()
    fams = families()
    picked = first_result("adaptr_family_for_config", ModelFamily, config=config, families=fams)
    if picked is not None:
        return picked
    model_type = config.get("model_type")
    return next((f for f in fams.values() if model_type in f.model_types), None)


def family_for_type(model_type: str) -> ModelFamily:
    """The family that covers ``model_type`` (for building tiny models)."""
    fam = family_for({"model_type": model_type})
    if fam is None:
        raise AdaptrError(
            f"no family covers model_type {model_type!r}; install a plugin for it (see `adaptr families`)"
        )
    return fam
