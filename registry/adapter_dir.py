"""Inspect and validate a PEFT adapter folder before anything of it is stored.

Works from ``adapter_config.json`` and safetensors headers alone (no torch, no peft), so
``adaptr add`` refuses a bad folder in milliseconds and never unpickles anything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from adaptr.errors import InvalidAdapterError, InvalidInputError, brief
from adaptr.values import human_size, is_number, is_whole, parse_json

from .safetensors_header import TensorInfo, read_header

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# Besides the config and safetensors weights, what save_pretrained / push_to_hub put beside
# an adapter: the model card, tokenizer files, chat templates, training results.
TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".model", ".tiktoken", ".yaml", ".yml")
MAX_WEIGHTS = 20 * 1024**3  # a LoRA of a 405B model at r=256 is a few GB
MAX_OTHER = 50 * 1024**2  # the largest tokenizer.json files are ~35 MB
MAX_RANK = 2**31 - 1  # stored in the index; no layer is wider
MAX_PATTERN = 1000  # characters of a target_modules / rank_pattern regex
PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+?)\.(?:(?P<ab>lora_A|lora_B)\.weight|(?P<emb>lora_embedding_A|lora_embedding_B)"
    r"|(?P<bias>lora_B\.bias)|(?P<mag>lora_magnitude_vector)(?:\.weight)?)$"
)
# what a Trainer checkpoint (and LLaMA-Factory's output folder) holds besides the adapter
TRAINING_STATE = re.compile(
    r"(trainer_state\.json|training_args\.(bin|json|ya?ml)|(optimizer|scheduler|scaler)\.(pt|bin)"
    r"|rng_state(_\d+)?\.pth|(all|train|eval|predict)_results\.json|trainer_log\.jsonl"
    r"|running_log\.txt|training_loss\.png|pytorch_model_fsdp\.bin|latest|zero_to_fp32\.py)"
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
    if target_modules == "all-linear":  # PEFT expands it on the model: every linear layer
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``get_pattern_key``: the first pattern matching a suffix of ``module``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def inspect_adapter(source: str | Path, *, allow_large: bool = False) -> AdapterSource:
    """Validate ``source`` as a PEFT adapter folder; raise InvalidAdapterError saying what is wrong.

    Stored: the config, safetensors weights (at most 20 GB each) and the text files an adapter
    folder holds (README, tokenizer files…, at most 50 MB each); ``allow_large`` lifts the two
    size limits. Skipped with a note: folders, hidden files, a Trainer's training state
    (trainer_state.json, optimizer.pt…), pickles and files of other kinds.
    """
    root = Path(source).expanduser()
    if root.is_symlink() and not root.exists():
        raise InvalidAdapterError(f"{root} is a broken symlink or a symlink loop; fix or remove it")
    if not root.exists():
        raise InvalidAdapterError(f"adapter folder {root} does not exist")
    if not root.is_dir():
        raise InvalidAdapterError(f"{root} is not a folder: give the folder save_pretrained wrote")
    real_root = _resolve(root)
    entries = sorted(root.iterdir())
    if not entries:
        raise InvalidAdapterError(
            f"adapter folder {root} is empty: expected {CONFIG} and {WEIGHTS}"
        )
    files, skipped, state = [], [], []
    for entry in entries:
        if entry.is_symlink():
            target = _resolve(entry)
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
        elif TRAINING_STATE.fullmatch(entry.name):
            state.append(entry.name)
        elif entry.suffix in PICKLE_SUFFIXES:
            skipped.append(f"{entry.name} (pickle, never loaded or stored)")
        elif not entry.is_file():
            skipped.append(f"{entry.name} (not a regular file)")
        elif entry.name != CONFIG and entry.suffix not in (".safetensors", *TEXT_SUFFIXES):
            skipped.append(f"{entry.name} (not an adapter file: not stored)")
        else:
            _check_size(entry, allow_large)
            files.append(entry)
    if state:
        skipped.append(f"{', '.join(state)} (training state, not part of an adapter)")
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


def _resolve(path: Path) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError on a symlink loop
        raise InvalidAdapterError(
            f"{path} is a symlink loop; remove it or point it at a file"
        ) from None


def _check_size(path: Path, allow_large: bool) -> None:
    weights = path.suffix == ".safetensors"
    limit = MAX_WEIGHTS if weights else MAX_OTHER
    size = path.stat().st_size
    if size > limit and not allow_large:
        what = "safetensors weights" if weights else "a file beside the weights"
        raise InvalidAdapterError(
            f"{path} is {human_size(size)}, more than an adapter holds ({what}: at most {human_size(limit)}); "
            "remove it, or add with --allow-large if it really belongs to the adapter"
        )


def _read_config(path: Path) -> dict:
    config = parse_json(path.read_bytes(), str(path), "an adapter config", InvalidAdapterError)
    if not isinstance(config, dict):
        raise InvalidAdapterError(f"{path} must hold a JSON object")
    if not isinstance(config.get("peft_type"), str):
        raise InvalidAdapterError(f"{path} has no peft_type: is this a PEFT adapter config?")
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", config["peft_type"]):
        raise InvalidAdapterError(
            f"{path}: peft_type {brief(config['peft_type'])} is not a PEFT method name (LORA, LOHA, IA3…)"
        )
    r = config.get("r")  # OFT saves r=0 (it sizes blocks instead); LoRA's r is checked below
    if config["peft_type"] != "LORA" and r is not None and not (is_whole(r) and 0 <= r <= MAX_RANK):
        raise InvalidAdapterError(
            f"{path}: r must be a whole number from 0 to {MAX_RANK}, got {brief(r)}"
        )
    if config.get("task_type") is not None and not (
        isinstance(config["task_type"], str) and len(config["task_type"]) <= 64
    ):
        raise InvalidAdapterError(
            f"{path}: task_type must be a name such as CAUSAL_LM, got {brief(config['task_type'])}"
        )
    base = config.get("base_model_name_or_path")
    if base is not None and (
        not isinstance(base, str) or len(base) > 1024 or not base.isprintable()
    ):
        raise InvalidAdapterError(
            f"{path}: base_model_name_or_path must be a model id or path, got {brief(base)}; "
            "fix it or set it to null and pass --base"
        )
    if config["peft_type"] == "LORA":
        _check_lora_config(path, config)
    return config


def _regex(path: Path, what: str, pattern: str, template: str = "{}") -> None:
    if len(pattern) > MAX_PATTERN:
        raise InvalidAdapterError(
            f"{path}: {what} {brief(pattern)} is longer than {MAX_PATTERN} characters"
        )
    try:
        re.compile(template.format(pattern))
    except (re.error, RecursionError, OverflowError) as e:
        raise InvalidAdapterError(
            f"{path}: {what} {brief(pattern)} is not a valid regular expression ({e}); "
            "PEFT matches it with re.fullmatch: fix it or give a list of module names"
        ) from None


def _check_lora_config(path: Path, config: dict) -> None:
    """The LoraConfig fields adaptr and PEFT read: types PEFT can load, regexes that compile."""

    def bad(key: str, need: str) -> InvalidAdapterError:
        return InvalidAdapterError(f"{path}: {key} must be {need}, got {brief(config[key])}")

    r = config.get("r")
    if not (is_whole(r) and 1 <= r <= MAX_RANK):
        raise InvalidAdapterError(f"{path}: r must be a positive integer, got {brief(r)}")
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            _regex(path, key, value)
        elif not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise bad(key, "a list of module names or a regex string")
    for key, check, need in (
        ("rank_pattern", lambda v: is_whole(v) and v >= 1, "positive integers"),
        ("alpha_pattern", is_number, "numbers"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise bad(key, f"a mapping of module-name patterns to {need}")
        for pattern, value in patterns.items():
            _regex(path, f"{key} key", pattern, r"(.*\.)?({})$")
            if not check(value):
                raise InvalidAdapterError(
                    f"{path}: {key}[{brief(pattern)}] must be one of {need}, got {brief(value)}"
                )
    if "lora_alpha" in config and not is_number(config["lora_alpha"]):
        raise bad("lora_alpha", "a number")
    dropout = config.get("lora_dropout")
    if dropout is not None and not (is_number(dropout) and 0 <= dropout <= 1):
        raise bad("lora_dropout", "a number between 0 and 1")
    for key in ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "inference_mode"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise bad(key, "true or false")
    if config.get("bias") is not None and config["bias"] not in ("none", "all", "lora_only"):
        raise bad("bias", "'none', 'all' or 'lora_only'")
    saved = config.get("modules_to_save")
    if saved is not None and (
        not isinstance(saved, list) or not all(isinstance(m, str) for m in saved)
    ):
        raise bad("modules_to_save", "a list of module names")
    layers = config.get("layers_to_transform")
    if layers is not None and not (
        (is_whole(layers) and layers >= 0)
        or (isinstance(layers, list) and all(is_whole(i) and i >= 0 for i in layers))
    ):
        raise bad("layers_to_transform", "a layer index or a list of them")


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
            raise InvalidAdapterError(f"{where}: {brief(module)} has {have} but not its partner")
        a, b = parts["lora_A"].shape, parts["lora_B"].shape
        linear = len(a) == len(b) == 2
        conv = len(a) == len(b) in (3, 4, 5) and all(k == 1 for k in b[2:])  # PEFT's Conv1d-3d
        if not (linear or conv) or 0 in a or 0 in b:
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has lora_A {list(a)} and lora_B {list(b)}; "
                "LoRA weights are non-empty matrices (linear and embedding layers), or a "
                "convolution's kernels with a 1x1 lora_B"
            )
        rank_a, rank_b = a[0], b[1]
        expected = pattern_value(cfg.get("rank_pattern"), module, cfg["r"])
        if rank_a != expected or rank_b != expected:
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has rank {rank_a}/{rank_b} (lora_A/lora_B) but the config says r={expected}"
            )
        bias = parts.get("bias")
        if bias is not None and bias.shape != (b[0],):
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has a lora_B bias of shape {list(bias.shape)}, not [{b[0]}]"
            )
        if tm and not targets(module, tm):
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has LoRA weights but is not in target_modules {brief(tm)}"
            )
        if ("magnitude" in parts) != use_dora:
            state = "has" if "magnitude" in parts else "lacks"
            raise InvalidAdapterError(
                f"{where}: {brief(module)} {state} a DoRA magnitude vector but use_dora={use_dora}"
            )
