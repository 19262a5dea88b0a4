"""Inspect and validate a PEFT adapter folder before anything of it is stored.

Works from ``adapter_config.json`` and safetensors headers alone (no torch, no peft), so
``adaptr add`` refuses a bad folder in milliseconds and never unpickles anything.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from adaptr.errors import InvalidAdapterError, InvalidInputError

from .safetensors_header import TensorInfo, read_header

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<ab>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B)"
    r"|(?P<bias>lora_B\.bias)|(?P<mag>lora_magnitude_vector)(?:\.weight)?)$"
)
SUMMARY_KEYS = (
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "bias",
    "use_dora", "use_rslora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern",
    "base_model_name_or_path",
)  # fmt: skip


@dataclass
class AdapterSource:
    """A validated adapter folder: what to store and what it holds."""

    root: Path
    files: list[Path]
    config: dict
    tensors: dict[str, TensorInfo]
    skipped: list[str] = field(default_factory=list)

    @property
    def lora_modules(self) -> dict[str, dict[str, TensorInfo]]:
        """Module path (as in the base model) -> its LoRA tensors keyed by role."""
        return lora_modules(self.tensors)

    def summary(self) -> dict:
        """The config fields adaptr shows and indexes, plus tensor counts."""
        out = {k: self.config.get(k) for k in SUMMARY_KEYS if k in self.config}
        out["lora_modules"] = len(self.lora_modules)
        out["parameters"] = sum(math.prod(t.shape) for t in self.tensors.values())
        out["dtypes"] = sorted({t.dtype for t in self.tensors.values()})
        return out


def lora_modules(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    modules: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        module = m["module"].removeprefix(PREFIX)
        role = m["ab"] or m["emb"] or ("bias" if m["bias"] else "magnitude")
        modules.setdefault(module, {})[role.replace("lora_embedding_", "lora_")] = info
    return modules


def targets(module: str, target_modules) -> bool:
    """PEFT's rule: a list matches exact names or dotted suffixes, a string is a full regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern matching a suffix of ``module``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def inspect_adapter(source: str | Path) -> AdapterSource:
    """Validate ``source`` as a PEFT adapter folder; raise InvalidAdapterError saying what is wrong."""
    root = Path(source).expanduser()
    if not root.exists():
        raise InvalidAdapterError(f"adapter folder {root} does not exist")
    if not root.is_dir():
        raise InvalidAdapterError(f"{root} is not a folder: give the folder save_pretrained wrote")
    real_root = root.resolve()
    entries = sorted(root.iterdir())
    if not entries:
        raise InvalidAdapterError(
            f"adapter folder {root} is empty: expected {CONFIG} and {WEIGHTS}"
        )
    files, skipped = [], []
    for entry in entries:
        if entry.is_symlink():
            target = entry.resolve()
            if not target.is_relative_to(real_root):
                raise InvalidAdapterError(
                    f"{entry} is a symlink to {target}, outside the adapter folder; "
                    f"copy the folder with `cp -rL` and add the copy"
                )
            if not target.exists():
                raise InvalidAdapterError(f"{entry} is a broken symlink; fix or remove it")
        if entry.is_dir():
            skipped.append(f"{entry.name}/ (folder)")
        elif entry.name.startswith("."):
            skipped.append(f"{entry.name} (hidden)")
        elif entry.suffix in PICKLE_SUFFIXES:
            skipped.append(f"{entry.name} (pickle, never loaded or stored)")
        elif entry.is_file():
            files.append(entry)
    names = {f.name for f in files}
    if CONFIG not in names:
        nested = sorted(p.parent.name for p in root.glob(f"*/{CONFIG}"))
        hint = (
            f"; it holds adapters in sub-folders {', '.join(nested)}: add one of those"
            if nested
            else ": is this the folder save_pretrained wrote?"
        )
        raise InvalidAdapterError(f"{root} has no {CONFIG}{hint}")
    config = _read_config(root / CONFIG)
    if WEIGHTS not in names:
        if (root / "adapter_model.bin").exists():
            raise InvalidAdapterError(
                f"{root} holds only adapter_model.bin, a pickle that adaptr never loads; "
                f"re-save it as safetensors with model.save_pretrained(dir, safe_serialization=True)"
            )
        raise InvalidAdapterError(
            f"{root} has no {WEIGHTS}: expected the weights save_pretrained writes"
        )
    tensors: dict[str, TensorInfo] = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                header, _ = read_header(f)
            except InvalidInputError as e:
                raise InvalidAdapterError(str(e)) from None
            if f.name == WEIGHTS:
                tensors = header
    if not tensors:
        raise InvalidAdapterError(f"{root / WEIGHTS} holds no tensors")
    adapter = AdapterSource(root, files, config, tensors, skipped)
    if config.get("peft_type") == "LORA":
        _check_lora(adapter)
    return adapter


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InvalidAdapterError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InvalidAdapterError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})"
        ) from None
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{path} must hold a JSON object")
    if not isinstance(config.get("peft_type"), str):
        raise InvalidAdapterError(f"{path} has no peft_type: is this a PEFT adapter config?")
    if config["peft_type"] == "LORA":
        r = config.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise InvalidAdapterError(f"{path}: r must be a positive integer, got {r!r}")
        tm = config.get("target_modules")
        if tm is not None and not isinstance(tm, (str, list)):
            raise InvalidAdapterError(f"{path}: target_modules must be a list or a regex string")
    return config


def _check_lora(adapter: AdapterSource) -> None:
    cfg = adapter.config
    modules = adapter.lora_modules
    where = f"{adapter.root / WEIGHTS} does not match {CONFIG}"
    if not modules:
        raise InvalidAdapterError(f"{where}: it holds no LoRA tensors (lora_A / lora_B)")
    tm = cfg.get("target_modules")
    use_dora = bool(cfg.get("use_dora"))
    for module, parts in sorted(modules.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            have = "lora_A" if "lora_A" in parts else "lora_B"
            raise InvalidAdapterError(f"{where}: {module} has {have} but not its partner")
        rank_a, rank_b = (
            parts["lora_A"].shape[0],
            parts["lora_B"].shape[1] if len(parts["lora_B"].shape) > 1 else -1,
        )
        expected = pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if rank_a != expected or rank_b != expected:
            raise InvalidAdapterError(
                f"{where}: {module} has rank {rank_a}/{rank_b} (lora_A/lora_B) but the config says r={expected}"
            )
        if tm and not targets(module, tm):
            raise InvalidAdapterError(
                f"{where}: {module} has LoRA weights but is not in target_modules {tm}"
            )
        if ("magnitude" in parts) != use_dora:
            state = "has" if "magnitude" in parts else "lacks"
            raise InvalidAdapterError(
                f"{where}: {module} {state} a DoRA magnitude vector but use_dora={use_dora}"
            )
