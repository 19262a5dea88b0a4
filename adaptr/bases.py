"""The one way to find, check and load a base model.

Registering (:func:`add_base`) and finding: a registered base name, a model folder, a GGUF
file (converted once into a cached folder, :mod:`adaptr.gguf`) or a Hub id
(:func:`resolve_base`); a version's recorded base (:func:`base_location`). Checking: a causal LM with a usable tokenizer, and adapters whose
shapes the base can hold, before any weight loads (:func:`check_base_fits`). Loading: for
training, as the recipe's ``base`` section says (dtype, 8-bit or 4-bit NF4,
:func:`load_model`), and for inference in full precision (:func:`load_base_model`). One
error class for each kind of problem: a path that is not a model folder is
:class:`~adaptr.errors.InvalidInputError` (exit 2), a base that cannot be found
:class:`~adaptr.errors.NotFoundError` (exit 3). Light to import: the registry and the
heavy libraries are imported where they are used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from adaptr.errors import InvalidInputError, NotFoundError, brief, clip, first_line

if TYPE_CHECKING:
    from adaptr.extend.types import ModelFamily
    from adaptr.registry import AdapterVersion, BaseRecord, Registry
    from adaptr.registry.fingerprint import BaseInfo
    from adaptr.registry.safetensors_header import TensorInfo


class FoundBase(NamedTuple):
    """A base as found: what to load, and the key recorded with a version trained on it."""

    path: str
    key: str


@dataclass
class BaseSettings:
    """How to load a base for training: the recipe's ``base`` section (checked by
    :meth:`adaptr.training.recipe.Recipe.check`; values are stored as given)."""

    path: str | None = None
    dtype: str = "auto"
    quantization: str = "none"
    family: str | None = None
    bnb_4bit_quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str | None = None
    trust_remote_code: bool = False


# ------------------------------------------------------------------ finding
def resolve_base(given: str, registry: Registry, *, what: str = "--base") -> FoundBase:
    """Find the base ``given`` names: a registered base, a model folder, a GGUF file
    (its cached conversion, made on first use) or a Hub id."""
    from adaptr.registry.atomic import check_path
    from adaptr.registry.fingerprint import looks_like_hub_id

    check_path(given, what)
    try:
        rec = registry.get_base(given)
        return FoundBase(rec.path, rec.name)
    except (NotFoundError, InvalidInputError):
        pass
    p = Path(given).expanduser()
    if p.exists():
        from adaptr import gguf

        if gguf.looks_like_gguf(p):  # converted once, then the cached folder (or its base)
            folder, name = gguf.resolve(p, registry)
            return FoundBase(str(folder), name or str(folder))
        if not (p / "config.json").is_file():
            raise InvalidInputError(f"base {brief(given)} is not a model folder (no config.json)")
        return FoundBase(str(p.resolve()), str(p.resolve()))
    if not looks_like_hub_id(given):
        raise NotFoundError(
            f"base {brief(given)} not found: give a model folder, a Hub id (org/name) or a name from `adaptr base list`"
        )
    return FoundBase(given, given)


def served_base(registry: Registry, given: str, *, what: str = "--base") -> FoundBase:
    """The base a server runs: a registered name, else a model folder or a GGUF file found
    as :func:`resolve_base` finds it (its key is the one versions trained on it record, so
    they are its adapters). A Hub id is not served unregistered: the unknown-base error."""
    from adaptr.registry.atomic import check_path

    check_path(given, what)
    try:
        rec = registry.get_base(given)
        return FoundBase(rec.path, rec.name)
    except (NotFoundError, InvalidInputError) as e:
        if not Path(given).expanduser().exists():
            raise e from None
    return resolve_base(given, registry, what=what)


def registered_base(registry: Registry, given: str, *, use: str, what: str = "--base") -> str:
    """The registered name of the base ``given`` names (a name, or the folder or GGUF file
    a registered base was made from, matched by path or by the file's SHA-256: nothing is
    converted), for what needs a registered base (``use``: what)."""
    from adaptr import gguf
    from adaptr.registry.atomic import check_path, regular_file

    check_path(given, what)
    try:
        return registry.get_base(given).name
    except (NotFoundError, InvalidInputError) as e:
        p = Path(given).expanduser()
        if not p.exists():
            raise e from None
    records = registry.bases()
    if gguf.looks_like_gguf(p):
        src = regular_file(p, "GGUF file", use="give a .gguf file").resolve()
        sha = gguf.file_sha256(src, gguf.cache_dir(registry)) if records else None
        names = [r.name for r in records if ((r.summary or {}).get("gguf") or {}).get("sha256") == sha]
    else:
        at = p.resolve()
        names = [r.name for r in records if r.path and Path(r.path).expanduser().resolve() == at]
    if names:
        return names[0]
    raise InvalidInputError(
        f"{use} runs a registered base, and {clip(given, 200)} is not one: register it with "
        f"`adaptr base add NAME {clip(given, 200)}` and give NAME"
    )


def base_location(registry: Registry, version: AdapterVersion, override: str | None = None) -> str:
    """A loadable path (or Hub id) for a version's base (``override``: the base given
    instead, found as :func:`resolve_base` finds it), or raise saying how to give one."""
    from adaptr.registry.fingerprint import looks_like_hub_id

    if override:
        return resolve_base(override, registry).path
    if not version.base:
        raise NotFoundError(f"{version.ref} records no base: pass --base PATH")
    path = registry.base_path(version.base)
    if Path(path).expanduser().exists() or looks_like_hub_id(path):
        return path
    raise NotFoundError(
        f"the base of {version.ref} ({version.base}) cannot be found at {path}: pass --base PATH or register it with `adaptr base add`"
    )


def add_base(
    registry: Registry,
    name: str,
    path: str,
    *,
    dtype: str | None = None,
    force: bool = False,
    on_note: Callable[[str], None] | None = None,
) -> tuple[BaseRecord, str | None]:
    """Register the model folder (or cached Hub id) ``path`` as base ``name``: a GGUF file
    is converted once (to ``dtype``, float32 by default) and its cached folder registered.
    Returns the record and the GGUF file it came from (None for a folder)."""
    from adaptr import gguf
    from adaptr.registry import check_name
    from adaptr.registry.atomic import check_path

    check_path(path, "PATH")
    check_name(name, "base name")
    if gguf.looks_like_gguf(path):
        folder = gguf.convert(
            path, dtype or gguf.DEFAULT_DTYPE, gguf.cache_dir(registry), on_note=on_note
        )
        return registry.add_base(name, folder, force=force), path
    if dtype is not None:
        raise InvalidInputError(
            f"--dtype applies to GGUF files, and {clip(path, 200)} is not one: "
            "a model folder is registered as it is"
        )
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "config.json").exists():
        files = sorted(p.name for p in folder.glob("*.gguf"))
        if files:
            raise InvalidInputError(
                f"{clip(path, 200)} holds GGUF files ({', '.join(files[:3])}) and no config.json: "
                f"give the file, e.g. `adaptr base add {name} {folder / files[0]}`"
            )
    return registry.add_base(name, path, force=force), None


# ------------------------------------------------------------------ checking
def _check_causal_lm(path: str, trust_remote_code: bool) -> dict:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"could not load base {path}: {first_line(e)}") from None
    heads = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = config.architectures or []
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not archs or any(a in heads for a in archs)
    )
    if not causal and not trust_remote_code:
        what = f"model_type {brief(config.model_type)}" + (
            f", architectures {brief(archs)}" if archs else ""
        )
        raise InvalidInputError(
            f"base {path} is not a causal language model ({what}); "
            "adaptr trains decoder-only models that AutoModelForCausalLM loads"
        )
    return config.to_dict()


def _tensors(registry: Registry, version: AdapterVersion) -> dict[str, TensorInfo]:
    """The tensors of a stored version, from its weights' header."""
    from adaptr.registry.adapter_dir import WEIGHTS
    from adaptr.registry.safetensors_header import read_header

    for f in version.files:
        if f.path == WEIGHTS:
            return read_header(registry.blobs.path(f.sha256))[0]
    return {}


def check_fits(registry: Registry, version: AdapterVersion, base: BaseInfo) -> None:
    """Refuse a stored version that ``base`` cannot hold, or that PEFT would load as nothing
    (keys without PEFT's prefix, stored by an adaptr that did not check them)."""
    from adaptr.registry.adapter_dir import PREFIX, lora_modules, saved_tensors
    from adaptr.registry.fingerprint import check_adapter_fits
    from adaptr.registry.peft_methods import unreplicated

    tensors = _tensors(registry, version)
    stray = [k for k in tensors if not k.startswith(PREFIX)] if version.peft_type == "LORA" else []
    if stray:
        raise InvalidInputError(
            f"{version.ref} holds {len(stray)} tensors, such as {brief(stray[0])}, without PEFT's "
            f"{PREFIX!r} prefix: PEFT would ignore them and the result would be the base unchanged; "
            f"re-save the adapter with PeftModel.save_pretrained and add it again"
        )
    check_adapter_fits(
        unreplicated(lora_modules(tensors), version.config),
        base,
        version.ref,
        saved_tensors(tensors) if version.peft_type == "LORA" else {},  # IA3, LoHa…: their own keys
        version.config.get("modules_to_save"),
    )


def check_base_fits(
    registry: Registry, versions: Sequence[AdapterVersion], base: str
) -> BaseInfo | None:
    """Refuse, before any weight is loaded, adapters whose LoRA shapes the base cannot hold.

    Reads the base's config and safetensors headers (as ``adaptr add`` does) and returns
    them; None for a Hub id that is not in the local cache, which
    :func:`adaptr.inference.attach` then checks on the loaded model instead
    (:func:`loaded_base`).
    """
    from adaptr.registry.fingerprint import find_base_dir, read_base

    found = find_base_dir(base)
    if found is None:
        return None
    info = read_base(found)
    for v in versions:
        check_fits(registry, v, info)
    return info


def loaded_base(model) -> BaseInfo:
    """What :func:`check_fits` needs, from a loaded model instead of its files."""
    from adaptr.registry.fingerprint import BaseInfo
    from adaptr.registry.safetensors_header import TensorInfo

    tensors = {
        n: TensorInfo(str(t.dtype), tuple(t.shape))
        for n, t in model.named_parameters(remove_duplicate=False)  # shapes only: no state_dict
    }
    name = getattr(model, "name_or_path", None) or type(model).__name__
    return BaseInfo(Path(name), model.config.to_dict(), tensors, "")


def context_window(config) -> int | None:
    """The most tokens the model reads, or None when RoPE scaling (YaRN, dynamic NTK…)
    takes it past ``max_position_embeddings`` by an amount the config does not bound."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    window = getattr(config, "max_position_embeddings", None)
    return window if isinstance(window, int) else None


# ------------------------------------------------------------------ loading
def _tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise InvalidInputError(
            f"could not load the tokenizer of base {path}: {first_line(e)}"
        ) from None


def load_tokenizer(
    path: str, *, trust_remote_code: bool = False, family: str | None = None
) -> tuple[Any, ModelFamily | None]:
    """The tokenizer of a causal LM base with its model family's fix-ups (pad token, chat
    template), and that family (``family``: its name, instead of the one that claims the
    base's config; None when none does). No weights are loaded."""
    from adaptr.extend.catalog import family_for, get_family

    config = _check_causal_lm(path, trust_remote_code)
    found = get_family(family) if family else family_for(config)
    tokenizer = _tokenizer(path, trust_remote_code)
    if found is not None:
        found.fix_tokenizer(tokenizer)
    if tokenizer.eos_token is None:
        raise InvalidInputError(
            f"the tokenizer of base {path} has no EOS token; set eos_token in its tokenizer_config.json"
        )
    return tokenizer, found


def _torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def _quantization_config(base: BaseSettings):
    """BitsAndBytesConfig for 8-bit or 4-bit NF4 and its compute dtype, or refuse."""
    import torch

    from adaptr.runtime import bitsandbytes_problem

    problem = bitsandbytes_problem()
    if problem:
        raise InvalidInputError(
            f"quantization {base.quantization} needs bitsandbytes, which cannot run here: {problem}; use --quantization none"
        )
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, base.compute_dtype) if base.compute_dtype else (
        torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    )  # fmt: skip
    if str(base.quantization) == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True), compute
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=base.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=bool(base.double_quant),
        bnb_4bit_compute_dtype=compute,
    ), compute  # fmt: skip


def load_model(path: str, base: BaseSettings, *, gradient_checkpointing: bool = False):
    """The base model to train, as the recipe's ``base`` section says (dtype, 8-bit or 4-bit
    NF4 through bitsandbytes, then ``prepare_model_for_kbit_training``)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"trust_remote_code": base.trust_remote_code}
    kwargs["dtype"] = _torch_dtype(base.dtype)
    quantized = str(base.quantization) != "none"
    if quantized:
        kwargs["quantization_config"], compute = _quantization_config(base)
        if base.dtype == "auto":
            kwargs["dtype"] = compute
    if torch.cuda.is_available() and "LOCAL_RANK" not in os.environ:
        kwargs["device_map"] = "auto"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"could not load base {path}: {first_line(e)}") from None
    if quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    return model


def load_base_model(path: str, dtype: str = "auto"):
    """The base model for inference (full precision unless the checkpoint itself is
    quantized) and its tokenizer as the base ships it: the chat template is chosen per
    adapter (:func:`adaptr.inference.chat_template`), not by the family's fix-ups."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=_torch_dtype(dtype))
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"could not load base {path}: {first_line(e)}") from None
    return model.eval(), _tokenizer(path)
