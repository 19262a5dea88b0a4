"""Training recipes: one YAML file (or dict) for base, data, LoRA and SFT settings.

```yaml
name: legal
tags: [prod]
from: legal@2                 # optional: continue training that version
base: {path: meta-llama/Llama-2-7b-hf, dtype: auto, quantization: 4bit}
data: {path: train.jsonl, format: alpaca, options: {lang: zh}, eval_split: 0.1,
       over_length: truncate}   # or drop / refuse: records longer than sft.max_length
lora: {r: 16, lora_alpha: 32, target_modules: attention}   # any peft.LoraConfig field
sft:  {num_train_epochs: 3, learning_rate: 2.0e-4}          # any trl.SFTConfig field
```

``method: dpo`` (or ``orpo``, ``kto``) trains with TRL's preference trainer instead, its
settings in the section of that name (``dpo: {beta: 0.1, loss_type: [sigmoid]}``: any
``trl.DPOConfig`` / ``trl.experimental.orpo.ORPOConfig`` / ``trl.KTOConfig`` field), on
preference data (see :mod:`adaptr.training.preference`).

``lora`` and ``sft`` pass through to PEFT and TRL unchanged; adaptr only fills in
defaults (the model family's LoRA settings, CPU/precision flags) where a field is unset.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any

from adaptr.bases import BaseSettings
from adaptr.data.sft import DataSettings
from adaptr.errors import InvalidInputError, brief
from adaptr.training.methods import METHODS, PREFERENCE
from adaptr.values import DTYPES, WEIGHT_DTYPES, decode_utf8, is_number, is_whole, parse_number

SECTIONS = {"name", "tags", "from", "method", "base", "data", "lora", "sft", "dpo", "orpo", "kto"}
OVER_LENGTH = ("truncate", "drop", "refuse")  # what happens to records longer than sft.max_length
QUANTIZATION = ("none", "8bit", "4bit")
MAX_RECIPE_BYTES = 1024 * 1024
MAX_YAML_VALUES = 10_000  # scalars, lists and mappings after expanding YAML aliases


def _suggest(key: Any, known: set[str] | list[str]) -> str:
    if not isinstance(key, str) or len(key) > 200:
        return ""
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


# SFTConfig fields that TRL/transformers take without checking and then fail on mid-setup
SFT_RULES = {
    "per_device_train_batch_size": (lambda v: is_whole(v) and v >= 1, "a positive whole number"),
    "per_device_eval_batch_size": (lambda v: is_whole(v) and v >= 1, "a positive whole number"),
    "gradient_accumulation_steps": (lambda v: is_whole(v) and v >= 1, "a positive whole number"),
    "max_length": (
        lambda v: v is None or (is_whole(v) and v >= 1),
        "a positive whole number (or null)",
    ),
    "max_steps": (lambda v: is_whole(v) and (v == -1 or v >= 1), "a positive whole number (or -1)"),
    "num_train_epochs": (lambda v: is_number(v) and v > 0, "a number above 0"),
    "learning_rate": (lambda v: is_number(v) and v >= 0, "a number of at least 0"),
    "seed": (lambda v: is_whole(v) and 0 <= v < 2**32, "a whole number from 0 to 2**32-1"),
}


def _number(value: Any) -> Any:
    """YAML reads '2e-4' as a string: a number-like string becomes the number."""
    number = parse_number(value) if isinstance(value, str) else None
    return value if number is None else number


def _key(key: Any) -> str:
    """A recipe key as written (``sft.max_steps``), or its short repr if it is odd."""
    if isinstance(key, str) and len(key) <= 80 and key.isprintable():
        return key
    return brief(key)


def _yaml_children(node) -> list:
    import yaml

    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root, where: str) -> None:
    """Refuse a YAML graph whose aliases expand past MAX_YAML_VALUES values, or loop."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            on_path.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in _yaml_children(node))
            if sizes[key] > MAX_YAML_VALUES:
                raise InvalidInputError(
                    f"{where} expands to more than {MAX_YAML_VALUES:,} values through YAML aliases "
                    "(&anchor / *alias); write the values out instead"
                )
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _yaml_children(node):
            if id(child) in on_path:
                raise InvalidInputError(
                    f"{where} holds a YAML alias that refers to itself (a recursive structure); "
                    "write the values out instead"
                )
            if id(child) not in sizes:
                stack.append((child, False))


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` that refuses alias bombs, self-references and deep nesting."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_document(self):
            node = super().compose_document()
            _check_expansion(node, where)
            return node

    try:
        return yaml.load(text, Loader=Loader)  # a SafeLoader
    except InvalidInputError:
        raise
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise InvalidInputError(f"{where} is not valid YAML{at}: {brief(problem)}") from None
    except RecursionError:
        raise InvalidInputError(f"{where} is nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:  # e.g. a date like 2024-13-45
        raise InvalidInputError(
            f"{where} holds a value YAML cannot read: {brief(str(e))}"
        ) from None


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, f: dataclasses.Field) -> Any:
    """YAML reads '2e-4' as a string; give numeric fields numbers (of the field's kind)."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if not isinstance(default, (int, float)) or isinstance(default, bool):
        return value
    number = parse_number(value) if isinstance(value, str) else None
    if number is None:
        return value
    return int(number) if isinstance(default, int) and float(number).is_integer() else float(number)


def _tags(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise InvalidInputError(f"tags in {where} must be a list of tag names, got {brief(value)}")
    return list(value)


class Recipe:
    """A validated training recipe; ``to_dict()`` is what gets stored with the version."""

    def __init__(self, doc: dict[str, Any] | None = None, *, source: str = "recipe"):
        doc = copy.deepcopy(doc or {})
        if not isinstance(doc, dict):
            raise InvalidInputError(
                f"{source} must be a mapping with sections {', '.join(sorted(SECTIONS))}"
            )
        for key in doc:
            if key not in SECTIONS:
                raise InvalidInputError(
                    f"unknown recipe key {brief(key)} in {source}{_suggest(key, SECTIONS)}"
                )
        self.source = source
        self.name: str | None = doc.get("name")
        self.tags: list[str] = _tags(doc.get("tags"), source)
        self.parent: str | None = doc.get("from")
        self.method: str = doc.get("method") or "sft"
        self.base = self._section(doc, "base", BaseSettings)
        self.data = self._section(doc, "data", DataSettings)
        self.lora: dict[str, Any] = self._mapping(doc, "lora")
        self.sft: dict[str, Any] = self._mapping(doc, "sft")
        self.dpo: dict[str, Any] = self._mapping(doc, "dpo")  # trl.DPOConfig fields
        self.orpo: dict[str, Any] = self._mapping(doc, "orpo")  # trl.experimental.orpo.ORPOConfig
        self.kto: dict[str, Any] = self._mapping(doc, "kto")  # trl.KTOConfig fields

    @property
    def args(self) -> dict[str, Any]:
        """The section of the recipe's method (``sft``, ``dpo``, ``orpo`` or ``kto``)."""
        return getattr(self, self.method) if self.method in METHODS else self.sft

    def _section(self, doc: dict, name: str, cls: type) -> Any:
        given, keys = self._mapping(doc, name), _fields(cls)
        for key in given:
            if key not in keys:
                raise InvalidInputError(
                    f"unknown recipe key {name}.{_key(key)} in {self.source}{_suggest(key, keys)}"
                )
        return cls(**given)

    def _mapping(self, doc: dict, name: str) -> dict[str, Any]:
        value = doc.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidInputError(f"recipe section {name!r} in {self.source} must be a mapping")
        return dict(value)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        if not path.exists():
            raise InvalidInputError(f"recipe file {path} does not exist")
        if not path.is_file():
            raise InvalidInputError(f"recipe {path} is not a file: give a YAML recipe file")
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise InvalidInputError(
                f"recipe file {path} is {path.stat().st_size:,} bytes; a recipe is a few hundred: "
                "is this the right file?"
            )
        text = decode_utf8(path.read_bytes(), f"recipe file {path}")
        return cls(load_yaml(text, f"recipe file {path}") or {}, source=str(path))

    def set(self, dotted: str, value: Any) -> None:
        """Override one setting: ``base.dtype``, ``data.format``, ``lora.r``, ``sft.max_steps``, ``name``…"""
        section, _, key = dotted.partition(".")
        if not key:
            if section not in ("name", "tags", "from", "method"):
                raise InvalidInputError(
                    f"unknown recipe key {brief(dotted)}{_suggest(dotted, SECTIONS)}"
                )
            if section == "tags":
                value = _tags(value, dotted)
            setattr(self, {"from": "parent"}.get(section, section), value)
            return
        if section in ("base", "data"):
            target = getattr(self, section)
            known = _fields(type(target))
            if key not in known:
                raise InvalidInputError(
                    f"unknown recipe key {section}.{_key(key)}{_suggest(key, known)}"
                )
            setattr(target, key, value)
        elif section in ("lora", *METHODS):
            getattr(self, section)[key] = value
        else:
            raise InvalidInputError(
                f"unknown recipe section {brief(section)}{_suggest(section, SECTIONS)}"
            )

    def validate(self) -> None:
        """Check required settings and every lora/sft key against PEFT's and TRL's configs.

        Training runs the same steps with the data in between, in this order:
        :meth:`check`, :meth:`settle_loss` (once the data's kind is known), :meth:`check_settings`.
        """
        self.check()
        self.check_settings()

    def check(self) -> None:
        """The checks that need no heavy library: required settings, types, choices (the
        one place the base and data sections are checked). The sft numbers it checks are
        read from number-like strings (``2e-4``)."""
        for what, value in (
            ("name", self.name),
            ("base.path", self.base.path),
            ("data.path", self.data.path),
            ("data.format", self.data.format),
        ):
            if not value:
                flag = {
                    "name": "--name",
                    "base.path": "--base",
                    "data.path": "--data",
                    "data.format": "--format",
                }[what]
                raise InvalidInputError(f"no {what} given: pass {flag} or set it in the recipe")
        self._check_types()
        if self.base.dtype not in DTYPES:
            raise InvalidInputError(
                f"base.dtype must be one of {', '.join(DTYPES)}, got {brief(self.base.dtype)}"
            )
        if str(self.base.quantization) not in QUANTIZATION:
            raise InvalidInputError(
                f"base.quantization must be one of {', '.join(QUANTIZATION)}, got {brief(self.base.quantization)}"
            )
        split = self.data.eval_split
        if split is not None and not (is_number(split) and 0 < split < 1):
            raise InvalidInputError(
                f"data.eval_split must be a fraction between 0 and 1, got {brief(split)}"
            )
        if self.data.over_length not in OVER_LENGTH:
            raise InvalidInputError(
                f"data.over_length must be one of {', '.join(OVER_LENGTH)}, got {brief(self.data.over_length)}"
            )
        if self.method not in METHODS:
            raise InvalidInputError(
                f"method must be one of {', '.join(METHODS)}, got {brief(self.method)}"
            )
        for other in METHODS:  # a section another method reads would be ignored, yet stored
            if other != self.method and getattr(self, other):
                raise InvalidInputError(
                    f"the {other} section ({', '.join(map(_key, getattr(self, other)))}) is for "
                    f"method {other}; this recipe trains with {self.method}: move the settings to "
                    f"its {self.method} section"
                )
        section = self.args
        for key, (ok, need) in SFT_RULES.items():
            if key in section:
                section[key] = _number(section[key])
                if not ok(section[key]):
                    raise InvalidInputError(
                        f"{self.method}.{key} must be {need}, got {brief(section[key])}"
                    )

    def settle_loss(self, kind: str) -> None:
        """Write into ``sft`` which tokens carry loss for ``kind`` records, where it is unset,
        so that the stored recipe says it (:func:`adaptr.data.sft.loss_tokens`)."""
        from adaptr.data.sft import loss_tokens

        if self.method != "sft":
            return  # preference trainers put the loss on the completions
        self.sft = {**self.sft, **loss_tokens(kind, self.sft).sft()}

    def check_settings(self) -> None:
        """Every lora/sft key against PEFT's LoraConfig and TRL's SFTConfig (imports both)."""
        from peft import LoraConfig

        from adaptr.training.methods import config_class

        for section, cls, skip in (
            ("lora", LoraConfig, {"peft_type", "task_type"}),
            (self.method, config_class(self.method), {"output_dir"}),
        ):
            known = _fields(cls)
            values = getattr(self, section)
            for key in list(values):
                if key not in known or key in skip:
                    raise InvalidInputError(
                        f"unknown recipe key {section}.{_key(key)} (not a {cls.__name__} field you can set){_suggest(key, set(known) - skip)}"
                    )
                values[key] = _coerce(values[key], known[key])

    def _check_types(self) -> None:
        """Settings adaptr itself reads must have the type it reads them as."""

        def need(what: str, value: Any, ok: bool, kind: str) -> None:
            if not ok:
                raise InvalidInputError(f"{what} must be {kind}, got {brief(value)}")

        def text(what: str, value: Any, optional: bool = False) -> None:
            ok = (value is None and optional) or (isinstance(value, str) and 0 < len(value) <= 4096)
            need(what, value, ok, "text" + (" (or unset)" if optional else ""))

        text("name", self.name)
        text("base.path", self.base.path)
        text("data.path", self.data.path)
        text("data.format", self.data.format)
        text("data.eval_path", self.data.eval_path, optional=True)
        text("base.family", self.base.family, optional=True)
        text("from", self.parent, optional=True)
        text("method", self.method)
        need("tags", self.tags, all(isinstance(t, str) for t in self.tags), "a list of tag names")
        options = self.data.options
        need("data.options", options, options is None or isinstance(options, dict), "a mapping")
        limit = self.data.limit
        need(
            "data.limit", limit,
            limit is None or (is_whole(limit) and limit > 0), "a positive whole number",
        )  # fmt: skip
        for key in ("trust_remote_code", "double_quant"):
            value = getattr(self.base, key)
            need(f"base.{key}", value, isinstance(value, bool), "true or false")
        compute = self.base.compute_dtype
        need(
            "base.compute_dtype", compute,
            compute is None or compute in WEIGHT_DTYPES, f"one of {', '.join(WEIGHT_DTYPES)}",
        )  # fmt: skip
        quant_type = self.base.bnb_4bit_quant_type
        need("base.bnb_4bit_quant_type", quant_type, quant_type in ("nf4", "fp4"), "nf4 or fp4")
        targets = self.lora.get("target_modules")
        need(
            "lora.target_modules", targets,
            targets is None
            or (isinstance(targets, str) and len(targets) <= 4096)
            or (isinstance(targets, list) and all(isinstance(t, str) and len(t) <= 256 for t in targets)),
            "a preset (attention, all-linear) or a list of module names",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({
            "name": self.name, "tags": self.tags, "from": self.parent,
            "base": dataclasses.asdict(self.base), "data": dataclasses.asdict(self.data),
            "lora": self.lora, "sft": self.sft, "method": self.method,
            **{m: getattr(self, m) for m in PREFERENCE if getattr(self, m)},
        })  # fmt: skip
