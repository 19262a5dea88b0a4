"""Training recipes: one YAML file (or dict) for base, data, LoRA and SFT settings.

```yaml
name: legal
tags: [prod]
from: legal@2                 # optional: continue training that version
base: {path: meta-llama/Llama-2-7b-hf, dtype: auto, quantization: 4bit}
data: {path: train.jsonl, format: alpaca, options: {lang: zh}, eval_split: 0.1}
lora: {r: 16, lora_alpha: 32, target_modules: attention}   # any peft.LoraConfig field
sft:  {num_train_epochs: 3, learning_rate: 2.0e-4}          # any trl.SFTConfig field
```

``lora`` and ``sft`` pass through to PEFT and TRL unchanged; adaptr only fills in
defaults (the model family's LoRA settings, CPU/precision flags) where a field is unset.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from pathlib import Path
from typing import Any

from .errors import InvalidInputError

SECTIONS = {"name", "tags", "from", "base", "data", "lora", "sft"}
BASE_KEYS = {
    "path": None, "dtype": "auto", "quantization": "none", "family": None,
    "bnb_4bit_quant_type": "nf4", "double_quant": True, "compute_dtype": None, "trust_remote_code": False,
}  # fmt: skip
DATA_KEYS = {
    "path": None,
    "format": None,
    "options": {},
    "eval_split": None,
    "eval_path": None,
    "limit": None,
}
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION = ("none", "8bit", "4bit")


def _suggest(key: str, known: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _coerce(value: Any, f: dataclasses.Field) -> Any:
    """YAML reads '2e-4' as a string; give numeric fields numbers."""
    default = f.default if f.default is not dataclasses.MISSING else None
    if (
        isinstance(value, str)
        and isinstance(default, (int, float))
        and not isinstance(default, bool)
    ):
        try:
            return (
                type(default)(float(value))
                if isinstance(default, int) and float(value).is_integer()
                else float(value)
            )
        except ValueError:
            return value
    return value


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
                    f"unknown recipe key {key!r} in {source}{_suggest(key, SECTIONS)}"
                )
        self.source = source
        self.name: str | None = doc.get("name")
        tags = doc.get("tags") or []
        self.tags: list[str] = [tags] if isinstance(tags, str) else list(tags)
        self.parent: str | None = doc.get("from")
        self.base = self._section(doc, "base", BASE_KEYS)
        self.data = self._section(doc, "data", DATA_KEYS)
        self.lora: dict[str, Any] = self._mapping(doc, "lora")
        self.sft: dict[str, Any] = self._mapping(doc, "sft")

    def _section(self, doc: dict, name: str, keys: dict[str, Any]) -> dict[str, Any]:
        given = self._mapping(doc, name)
        for key in given:
            if key not in keys:
                raise InvalidInputError(
                    f"unknown recipe key {name}.{key} in {self.source}{_suggest(key, keys)}"
                )
        return {**copy.deepcopy(keys), **given}

    def _mapping(self, doc: dict, name: str) -> dict[str, Any]:
        value = doc.get(name) or {}
        if not isinstance(value, dict):
            raise InvalidInputError(f"recipe section {name!r} in {self.source} must be a mapping")
        return dict(value)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise InvalidInputError(f"recipe file {path} does not exist")
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise InvalidInputError(
                f"recipe file {path} is not valid YAML{where}: {getattr(e, 'problem', e)}"
            ) from None
        return cls(doc or {}, source=str(path))

    def set(self, dotted: str, value: Any) -> None:
        """Override one setting: ``base.dtype``, ``data.format``, ``lora.r``, ``sft.max_steps``, ``name``…"""
        section, _, key = dotted.partition(".")
        if not key:
            if section not in ("name", "tags", "from"):
                raise InvalidInputError(
                    f"unknown recipe key {dotted!r}{_suggest(dotted, SECTIONS)}"
                )
            setattr(self, {"from": "parent"}.get(section, section), value)
            return
        if section in ("base", "data"):
            target, known = getattr(self, section), (BASE_KEYS if section == "base" else DATA_KEYS)
            if key not in known:
                raise InvalidInputError(f"unknown recipe key {dotted}{_suggest(key, known)}")
            target[key] = value
        elif section in ("lora", "sft"):
            getattr(self, section)[key] = value
        else:
            raise InvalidInputError(
                f"unknown recipe section {section!r}{_suggest(section, SECTIONS)}"
            )

    def validate(self) -> None:
        """Check required settings and every lora/sft key against PEFT's and TRL's configs."""
        from peft import LoraConfig
        from trl import SFTConfig

        for what, value in (
            ("name", self.name),
            ("base.path", self.base["path"]),
            ("data.path", self.data["path"]),
            ("data.format", self.data["format"]),
        ):
            if not value:
                flag = {
                    "name": "--name",
                    "base.path": "--base",
                    "data.path": "--data",
                    "data.format": "--format",
                }[what]
                raise InvalidInputError(f"no {what} given: pass {flag} or set it in the recipe")
        if self.base["dtype"] not in DTYPES:
            raise InvalidInputError(
                f"base.dtype must be one of {', '.join(DTYPES)}, got {self.base['dtype']!r}"
            )
        if str(self.base["quantization"]) not in QUANTIZATION:
            raise InvalidInputError(
                f"base.quantization must be one of {', '.join(QUANTIZATION)}, got {self.base['quantization']!r}"
            )
        split = self.data["eval_split"]
        if split is not None and not (isinstance(split, (int, float)) and 0 < float(split) < 1):
            raise InvalidInputError(
                f"data.eval_split must be a fraction between 0 and 1, got {split!r}"
            )
        for section, cls, skip in (
            ("lora", LoraConfig, {"peft_type", "task_type"}),
            ("sft", SFTConfig, {"output_dir"}),
        ):
            known = _fields(cls)
            values = getattr(self, section)
            for key in list(values):
                if key not in known or key in skip:
                    raise InvalidInputError(
                        f"unknown recipe key {section}.{key} (not a {cls.__name__} field you can set){_suggest(key, set(known) - skip)}"
                    )
                values[key] = _coerce(values[key], known[key])

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy({
            "name": self.name, "tags": self.tags, "from": self.parent,
            "base": self.base, "data": self.data, "lora": self.lora, "sft": self.sft,
        })  # fmt: skip
