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
from adaptr.registry.patterns import KEYED, LAYERS, adapter_names, check_patterns, guard
from adaptr.registry.peft_methods import check_config, unreplicated
from adaptr.registry.safetensors_header import TensorInfo, read_header
from adaptr.values import human_size, is_number, is_whole, parse_json

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
# The tensors of a LoRA layer, as PeftModel.save_pretrained names them after the module path:
# lora_A.weight, lora_B.weight, lora_B.bias, lora_embedding_A, lora_embedding_B and
# lora_magnitude_vector (DoRA). Saved from a model's own state_dict they carry the adapter's
# name (lora_A.default.weight, lora_embedding_A.default, lora_magnitude_vector.default.weight,
# embed_tokens.modules_to_save.default.weight). PEFT applies LoRA keys spelled so only when
# loading under that adapter name, and fails on such modules_to_save keys: adaptr stores them
# renamed to the save_pretrained spelling (:func:`plan_keys`), which loads under any name.
# LoRA variants keep more tensors on each layer, in a ParameterDict or BufferDict (saved
# without .weight, like the embedding's): KaSA's singular values, VeLoRA's projection. Each
# is named after the LoraConfig field that turns its variant on.
_PAIR = ("lora_A", "lora_B")
_EMBEDDING = ("lora_embedding_A", "lora_embedding_B")
_MAGNITUDE = "lora_magnitude_vector"
VARIANT_TENSORS = {"lora_diag": "kasa_config", "lora_velora_embed": "velora_config"}
_ROLES = frozenset((*_PAIR, *_EMBEDDING, _MAGNITUDE, *VARIANT_TENSORS))
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
    """A validated adapter folder: what to store and what it holds.

    ``tensors`` are keyed as PEFT's save_pretrained names them; ``renames`` maps the keys the
    folder's weights spell otherwise (with an adapter name) to those, and is empty when the
    weights can be stored as they are.
    """

    root: Path
    files: list[Path]
    config: dict
    tensors: dict[str, TensorInfo]
    skipped: list[str] = field(default_factory=list)
    renames: dict[str, str] = field(default_factory=dict)
    adapter_names: list[str] = field(default_factory=list)

    @property
    def lora_modules(self) -> dict[str, dict[str, TensorInfo]]:
        """Module path (as in the base model: see :func:`unreplicated`) -> its LoRA tensors
        keyed by role."""
        return unreplicated(lora_modules(self.tensors), self.config)

    def summary(self) -> dict:
        """The config fields adaptr shows and indexes, plus tensor counts."""
        out = {k: self.config.get(k) for k in SUMMARY_KEYS if k in self.config}
        out["lora_modules"] = len(lora_modules(self.tensors))
        out["parameters"] = sum(math.prod(t.shape) for t in self.tensors.values())
        out["dtypes"] = sorted({t.dtype for t in self.tensors.values()})
        return out


def canonical_key(key: str) -> tuple[str, str | None] | None:
    """``(key as save_pretrained spells it, the adapter name the key carried or None)``.

    None for a LoRA-looking key in no spelling PEFT loads (``lora_A.x.y.weight``…). Keys that
    are not LoRA tensors (a modules_to_save copy, a saved embedding) come back unchanged,
    less a ``modules_to_save.NAME`` part.
    """
    parts = key.split(".")
    for i in range(len(parts) - 1, -1, -1):
        role = parts[i]
        if role in _ROLES:
            break
        if role == "modules_to_save":  # ModulesToSaveWrapper's: MODULE.modules_to_save.NAME.weight
            rest = parts[i + 1 :]
            if i == 0 or len(rest) < 2:
                return None
            return ".".join(parts[:i] + rest[1:]), rest[0]
    else:
        return key, None
    head, rest = ".".join(parts[: i + 1]), parts[i + 1 :]
    if role in _PAIR:
        params = ("weight", "bias") if role == "lora_B" else ("weight",)
        if len(rest) == 1 and rest[0] in params:
            return key, None
        if len(rest) == 2 and rest[1] in params:
            return f"{head}.{rest[1]}", rest[0]
    elif role in _EMBEDDING or role in VARIANT_TENSORS:  # a ParameterDict's: no .weight
        if not rest:
            return key, None
        if len(rest) == 1 and rest[0] not in ("weight", "bias"):
            return head, rest[0]
    else:  # DoRA: saved without .weight; PEFT also loads it with .weight, and NAME.weight
        if not rest or rest == ["weight"]:
            return head, None
        if rest[-1] == "weight" and len(rest) == 2 or len(rest) == 1 and rest[0] != "bias":
            return head, rest[0]  # NAME alone: an older PEFT's ParameterDict
    return None


def _split_lora(key: str) -> tuple[str, str] | None:
    """``(module path, role)`` of a save_pretrained-spelled LoRA key, else None."""
    module, _, last = key.rpartition(".")
    if last in ("weight", "bias") and module.rpartition(".")[2] in _PAIR:
        module, _, role = module.rpartition(".")
        if last == "weight":
            return module, role
        return (module, "bias") if role == "lora_B" else None
    if last in _EMBEDDING:
        return module, last.replace("lora_embedding_", "lora_")
    if last in VARIANT_TENSORS:
        return module, last
    if last == _MAGNITUDE:
        return module, "magnitude"
    return None


def lora_modules(tensors: dict[str, TensorInfo]) -> dict[str, dict[str, TensorInfo]]:
    """Module path (without PEFT's prefix) -> its LoRA tensors keyed by role
    (``lora_A``, ``lora_B``, ``bias``, ``magnitude``, and a variant's own: ``lora_diag``…);
    keys spelled as save_pretrained does."""
    modules: dict[str, dict[str, TensorInfo]] = {}
    for key, info in tensors.items():
        split = _split_lora(key)
        if split is not None:
            module, role = split
            modules.setdefault(module.removeprefix(PREFIX), {})[role] = info
    return modules


def saved_tensors(tensors: dict[str, TensorInfo]) -> dict[str, tuple[str, TensorInfo]]:
    """The tensors an adapter saves whole (modules_to_save copies, resized embeddings): the
    base model tensor each replaces -> (its key in the adapter, its shape).

    PEFT loads them over the base's own tensor of that name (``MODULE.base_layer.weight``
    is the base weight of a LoRA-wrapped module); trainable-token deltas are not included.
    """
    out = {}
    for key, info in tensors.items():
        if not key.startswith(PREFIX) or _split_lora(key) or ".token_adapter." in key:
            continue
        out[key.removeprefix(PREFIX).replace(".base_layer.", ".")] = (key, info)
    return out


def plan_keys(tensors: dict[str, TensorInfo], where: str) -> tuple[dict[str, str], list[str]]:
    """``(renames, adapter names)``: the keys to rename to save_pretrained's spelling and the
    adapter names they carried. Raises InvalidAdapterError for what PEFT would not load:
    keys of several adapters, two spellings of one tensor, a whole model's state_dict
    (``original_module``), LoRA keys in no spelling PEFT reads.
    """
    renames: dict[str, str] = {}
    names: dict[str, str] = {}  # adapter name -> one key that carried it
    seen: dict[str, str] = {}
    twice: tuple[str, str] | None = None
    again = "re-save the adapter with PeftModel.save_pretrained"
    for key in tensors:
        if ".original_module." in f".{key}.":
            raise InvalidAdapterError(
                f"{where}: {brief(key)} is the base model's own copy of a module in modules_to_save, "
                f"not part of an adapter (a whole model's state_dict was saved); {again}"
            )
        canon = canonical_key(key)
        if canon is None:
            raise InvalidAdapterError(
                f"{where}: {brief(key)} is a LoRA tensor in no spelling PEFT loads (it would be "
                f"ignored); {again}"
            )
        new, name = canon
        if name is not None:
            names.setdefault(name, key)
        twice = twice or (new in seen and (seen[new], key))
        seen[new] = key
        if new != key:
            renames[key] = new
    if len(names) > 1:
        listed = ", ".join(repr(n) for n in sorted(names)[:4])
        raise InvalidAdapterError(
            f"{where} holds the tensors of several adapters ({listed}), PEFT loads one: save each "
            "with save_pretrained(dir, selected_adapters=[NAME]) and add them one by one"
        )
    if twice:
        raise InvalidAdapterError(
            f"{where} holds {brief(twice[0])} and {brief(twice[1])}, two spellings of one tensor: "
            "keep one of them"
        )
    return renames, sorted(names)


def targets(module: str, target_modules, config: dict | None = None) -> bool:
    """PEFT's rule (``check_target_module_exists``): a list matches exact names or dotted
    suffixes, a string is a full regex; with ``config``, also its exclude_modules,
    modules_to_save and layers_to_transform, whose modules PEFT gives no LoRA layer.
    Patterns are matched once :func:`~.patterns.guard` has bounded them."""
    config = config or {}
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and re.fullmatch(guard("exclude_modules", exclude), module):
        return False
    if isinstance(exclude, list) and any(module == e or module.endswith("." + e) for e in exclude):
        return False
    for m in config.get("modules_to_save") or ():
        if re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", module):
            return False
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":  # PEFT expands it to every linear layer
            return True
        return re.fullmatch(guard("target_modules", target_modules), module) is not None
    if module in target_modules:
        return True
    if not any(module.endswith("." + t) for t in target_modules):
        return False
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern") or [None]
    match = None
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if pattern is None:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
        else:
            match = re.match(guard("layers_pattern", pattern, LAYERS), module)
        if match:
            break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers


def pattern_value(patterns: dict, module: str, default, field: str | None = None):
    """PEFT's ``get_pattern_key``: the first pattern matching a suffix of ``module``.
    InvalidAdapterError for a pattern that cannot be matched in bounded time (``field``:
    the config field, for the message)."""
    label = f"{field} key" if field else "rank_pattern / alpha_pattern key"
    for key, value in (patterns or {}).items():
        if re.match(guard(label, key, KEYED), module):
            return value
    return default


def inspect_adapter(source: str | Path, *, allow_large: bool = False) -> AdapterSource:
    """Validate ``source`` as a PEFT adapter folder; raise InvalidAdapterError saying what is wrong.

    Stored: the config, safetensors weights (at most 20 GB each) and the text files an adapter
    folder holds (README, tokenizer files…, at most 50 MB each); ``allow_large`` lifts the two
    size limits. Skipped with a note: folders, hidden files, a Trainer's training state
    (trainer_state.json, optimizer.pt…), pickles and files of other kinds. For a LoRA, the
    weights' keys are checked and planned (:func:`plan_keys`): ``tensors`` are spelled as
    save_pretrained writes them, whatever the file spells.
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
        adapter.renames, adapter.adapter_names = plan_keys(tensors, str(root / WEIGHTS))
        adapter.tensors = {adapter.renames.get(k, k): t for k, t in tensors.items()}
    # before anything matches them: patterns that would hang PEFT (or _check_lora) are refused
    check_patterns(config, adapter_names(adapter.tensors), str(root / CONFIG))
    check_config(config, str(root / CONFIG))  # a method or fields the installed PEFT lacks
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
    spans = config.get("layer_replication")
    if spans is not None and not (
        isinstance(spans, list)
        and all(
            isinstance(p, list)
            and len(p) == 2
            and all(is_whole(i) and i >= 0 for i in p)
            and p[0] < p[1]
            for p in spans
        )
    ):
        raise bad("layer_replication", "a list of [start, end] layer ranges, start < end")
    pattern = config.get("layers_pattern")
    if pattern is not None:
        if isinstance(pattern, str):
            pattern = [pattern]
        if not isinstance(pattern, list) or not all(isinstance(p, str) for p in pattern):
            raise bad("layers_pattern", "a module-name pattern or a list of them")
        for p in pattern:
            _regex(path, "layers_pattern", p, r"(?:^|.*?\.){}\.(?P<idx>\d+)\.")


def _check_lora(adapter: AdapterSource) -> None:
    cfg = adapter.config
    modules = lora_modules(adapter.tensors)  # as the adapter's own (replicated) layers name them
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
        expected = pattern_value(cfg.get("rank_pattern"), module, cfg["r"], "rank_pattern")
        if rank_a != expected or rank_b != expected:
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has rank {rank_a}/{rank_b} (lora_A/lora_B) but the config says r={expected}"
            )
        bias = parts.get("bias")
        if bias is not None and bias.shape != (b[0],):
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has a lora_B bias of shape {list(bias.shape)}, not [{b[0]}]"
            )
        if tm and not targets(module, tm, cfg):
            why = (
                f"is not in target_modules {brief(tm)}"
                if not targets(module, tm)
                else "is left out by the config's exclude_modules, modules_to_save or layers_to_transform"
            )
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has LoRA weights but {why}: PEFT gives it no LoRA layer "
                "and would ignore them"
            )
        if ("magnitude" in parts) != use_dora:
            state = "has" if "magnitude" in parts else "lacks"
            raise InvalidAdapterError(
                f"{where}: {brief(module)} {state} a DoRA magnitude vector but use_dora={use_dora}"
            )
        for tensor, flag in VARIANT_TENSORS.items():
            if (tensor in parts) != bool(cfg.get(flag)):
                state = "has" if tensor in parts else "lacks"
                raise InvalidAdapterError(
                    f"{where}: {brief(module)} {state} a {tensor} tensor but {flag} is "
                    f"{'not set' if tensor in parts else 'set'}: PEFT would "
                    f"{'ignore it' if tensor in parts else 'make one up'}"
                )
        diag = parts.get("lora_diag")
        if diag is not None and diag.shape != (rank_a,):
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has a lora_diag of shape {list(diag.shape)}, not [{rank_a}]"
            )
        embed = parts.get("lora_velora_embed")
        if embed is not None and (len(embed.shape) != 1 or 0 in embed.shape):
            raise InvalidAdapterError(
                f"{where}: {brief(module)} has a lora_velora_embed of shape {list(embed.shape)}, "
                "not a vector"
            )
    weights = adapter.root / WEIGHTS
    stray = [k for k in adapter.tensors if not k.startswith(PREFIX)]
    if stray:
        raise InvalidAdapterError(
            f"{weights}: {len(stray)} of {len(adapter.tensors)} tensors, such as {brief(stray[0])}, do "
            f"not start with {PREFIX!r}, so PEFT would ignore them; re-save the adapter with "
            f"PeftModel.save_pretrained, or put {PREFIX!r} in front of every key"
        )
    for name, (key, _) in saved_tensors(adapter.tensors).items():
        module, _, param = name.rpartition(".")
        if module in modules and ".base_layer." not in key:
            raise InvalidAdapterError(
                f"{weights}: {brief(key)} is a whole {param} of a module with LoRA weights: PEFT "
                f"loads it only as {module}.base_layer.{param} and would ignore it; re-save the "
                "adapter with PeftModel.save_pretrained"
            )
