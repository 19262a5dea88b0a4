"""The plugin API's types: :class:`ModelFamily` (what differs per architecture) and
:class:`Formatter` (one raw record in, one TRL record out), with the errors a formatter raises.

A leaf: it imports nothing of adaptr but errors, so hookspecs, the manager and the look-ups
in :mod:`adaptr.extend.catalog` all stand on it.

TRL records are ``{"text": …}`` (language modelling), ``{"prompt": …, "completion": …}``
(loss on the completion only) or ``{"messages": [{"role", "content"}, …]}`` (chat; loss on
assistant turns with ``assistant_only_loss``), with ``"tools"`` (a JSON string) and assistant
``tool_calls`` / ``tool`` messages for tool use (see :mod:`adaptr.data.chat`). Formatters never
pre-render a chat into one string where TRL needs the structure.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Any

from adaptr.errors import InvalidInputError, brief

KINDS = ("text", "prompt-completion", "messages", "preference", "unpaired-preference")
MISSING = ("is missing", "is empty")


class MissingField(InvalidInputError):
    """A record lacks a field the formatter needs; the loader adds file and line.

    ``hint`` says how to map another field (set by :class:`Formatter` when one of its options
    names the field); ``Formatter.explain`` puts both into one message.
    """

    def __init__(self, name: str, why: str = "is missing", hint: str | None = None):
        self.field, self.why, self.hint = name, why, None
        super().__init__(f"field {name!r} {why}")
        if hint:
            self.add_hint(hint)

    def add_hint(self, hint: str) -> None:
        self.hint = hint
        self.args = (f"field {self.field!r} {self.why}; {hint}",)


class MultimodalData(InvalidInputError):
    """A record holds images, audio or video (parts, record keys or placeholders)."""


def need(record: dict[str, Any], *names: str) -> list[Any]:
    """The values of ``names`` in ``record``; raises MissingField for the first absent or empty one."""
    values = []
    for name in names:
        value = record.get(name)
        if value is None or (isinstance(value, str) and not value.strip()):
            raise MissingField(name, MISSING[0] if name not in record else MISSING[1])
        values.append(value)
    return values


@dataclass
class Formatter:
    """A named way to turn raw records into TRL records."""

    name: str = field(metadata={"help": "Short unique name, used as --format."})
    format: Callable[..., dict[str, Any]] = field(
        metadata={"help": "format(record, **options) -> TRL record."}
    )
    kind: str = field(
        default="prompt-completion",
        metadata={"help": "text | prompt-completion | messages | preference | unpaired-preference"},
    )
    fields: list[str] = field(
        default_factory=list, metadata={"help": "Fields a raw record needs (for docs and errors)."}
    )
    options: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "Options with their defaults."}
    )
    description: str = ""
    plugin: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InvalidInputError(
                f"formatter {self.name!r}: kind must be one of {', '.join(KINDS)}"
            )
        if not getattr(self.format, "_adaptr_hints", False):
            self.format = self._hinting(self.format)

    def _hinting(self, fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        """``fn`` whose MissingField errors say which option maps the field (see ``hint``)."""

        @functools.wraps(fn)
        def format(record: dict[str, Any], **options: Any) -> dict[str, Any]:
            try:
                return fn(record, **options)
            except MissingField as e:
                if e.hint is None and e.why in MISSING and (hint := self.hint(e.field, options)):
                    e.add_hint(hint)
                raise

        format._adaptr_hints = True  # type: ignore[attr-defined]
        return format

    def hint(self, name: str, options: dict[str, Any] | None = None) -> str | None:
        """How to read field ``name`` from another field: the option whose value names it."""
        values = {**self.options, **(options or {})}
        option = next((k for k, v in values.items() if isinstance(v, str) and v == name), None)
        return f"map another field with --format-option {option}=NAME" if option else None

    def explain(self, error: MissingField) -> str:
        """``error`` with what this format needs and how to map a field, for one message:
        ``field 'messages' is missing (the messages format needs messages; map another field
        with --format-option field=NAME)``."""
        notes = [f"the {self.name} format needs {', '.join(self.fields)}"] if self.fields else []
        notes += [error.hint] if error.hint else []
        return f"field {error.field!r} {error.why}" + (f" ({'; '.join(notes)})" if notes else "")

    def check_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The full option set (defaults filled in); raises on an unknown option."""
        if not isinstance(options, dict):
            raise InvalidInputError(
                f"format {self.name} options must be a mapping, got {brief(options)}"
            )
        unknown = [k for k in options if k not in self.options]
        if unknown:
            raise InvalidInputError(
                f"format {self.name} has no option {brief(unknown[0])}; options: {', '.join(self.options) or 'none'}"
            )
        return {**self.options, **options}

    def __call__(self, record: dict[str, Any], **options: Any) -> dict[str, Any]:
        return self.format(record, **self.check_options(options))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "fields": self.fields, "options": self.options,
                "description": self.description, "plugin": self.plugin}  # fmt: skip


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
    prompt_template: InitVar[str | None] = None  # unused since 0.1: prompts are sent as given
    tiny_configs: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "model_type -> small config kwargs for smoke tests."},
    )
    description: str = ""
    plugin: str | None = field(
        default=None, metadata={"help": "Set by adaptr: the plugin that registered it."}
    )
    tool_format: str | None = field(
        default=None,
        metadata={
            "help": "How chat_template writes tool calls, for adaptr serve to parse them: hermes, "
            "llama3_json, mistral (adaptr.serving.openai.tools.FORMATS; a plugin may register one)."
        },
    )

    def __post_init__(self, prompt_template: str | None = None) -> None:
        if prompt_template is not None:
            warnings.warn(
                f"family {self.name!r}: ModelFamily(prompt_template=...) is not used by adaptr"
                " (prompts go to the model as given, chats through the chat template); drop it",
                DeprecationWarning,
                stacklevel=3,
            )
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = {"attention": list(self.target_modules)}
        self.target_modules = dict(self.target_modules)
        self.target_modules.setdefault("all-linear", "all-linear")
        if not self.model_types:
            raise InvalidInputError(f"family {self.name!r} names no model_types")
        if self.tool_format is not None and not (
            isinstance(self.tool_format, str) and self.tool_format.isidentifier()
        ):
            raise InvalidInputError(
                f"family {self.name!r}: tool_format must be a format's name (e.g. 'hermes'), "
                f"got {brief(self.tool_format)}"
            )

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
            "description": self.description, "plugin": self.plugin, "tool_format": self.tool_format,
        }  # fmt: skip
