"""Base models: find their files, fingerprint them, and check that an adapter fits one.

The fingerprint is a SHA-256 over the architecture-defining config and every tensor's
name, shape and dtype, read from safetensors headers: two copies of the same base agree,
a different model or size does not, and computing it never loads a weight.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from adaptr.errors import (
    IncompatibleBaseError,
    InvalidAdapterError,
    InvalidInputError,
    brief,
)
from adaptr.registry.safetensors_header import TensorInfo, read_header
from adaptr.values import parse_json

VOLATILE_KEYS = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "output_attentions", "output_hidden_states", "return_dict", "_attn_implementation",
    "_attn_implementation_autoset", "_commit_hash",
}  # fmt: skip


@dataclass
class BaseInfo:
    """What adaptr knows about a base model folder."""

    path: Path
    config: dict
    tensors: dict[str, TensorInfo]
    fingerprint: str

    @property
    def quantized(self) -> bool:
        return "quantization_config" in self.config

    def summary(self) -> dict:
        c = self.config
        return {
            "model_type": c.get("model_type"),
            "architectures": c.get("architectures"),
            "hidden_size": c.get("hidden_size"),
            "num_hidden_layers": c.get("num_hidden_layers"),
            "vocab_size": c.get("vocab_size"),
            "quantized": self.quantized,
            "tensors": len(self.tensors),
            "parameters": sum(_numel(t) for t in self.tensors.values()),
            **({"gguf": c["adaptr_gguf"]} if isinstance(c.get("adaptr_gguf"), dict) else {}),
        }


def _numel(t: TensorInfo) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def looks_like_hub_id(text: str) -> bool:
    """``org/name``: not a relative, absolute or home path, exactly one slash."""
    return not text.startswith((".", "/", "~")) and text.count("/") == 1


def find_base_dir(path_or_id: str) -> Path | None:
    """A local model folder for ``path_or_id``: the path itself, or its Hugging Face cache snapshot."""
    from adaptr.registry.atomic import check_path

    check_path(path_or_id, "base")  # a name no file system holds: one line, not an OSError
    p = Path(path_or_id).expanduser()
    if (p / "config.json").is_file():
        return p.resolve()
    if not looks_like_hub_id(path_or_id):
        return None
    repo = hub_cache_dir() / ("models--" + path_or_id.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").is_file():
            return snap
    return None


def read_base(path: str | Path) -> BaseInfo:
    """Read a base model folder's config and tensor headers (no weights are loaded)."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise InvalidInputError(f"{path} is not a model folder (no config.json)")
    config = parse_json(cfg_path.read_bytes(), str(cfg_path), "a model config")
    if not isinstance(config, dict):
        raise InvalidInputError(f"{cfg_path} must hold a JSON object")
    tensors: dict[str, TensorInfo] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        doc = parse_json(index.read_bytes(), str(index), "a weights index")
        try:
            shards = sorted(set(doc["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise InvalidInputError(
                f'{index} is malformed: expected {{"weight_map": {{tensor: shard file}}}}'
            ) from None
        for shard in shards:  # plain names beside the index (Hub cache files are symlinks)
            if not (
                isinstance(shard, str)
                and shard not in ("", ".", "..")
                and "/" not in shard
                and "\\" not in shard
                and (path / shard).is_file()
            ):
                raise InvalidInputError(
                    f"{index} names shard {brief(shard)}, which is not a file in {path}"
                )
    else:
        shards = sorted(p.name for p in path.glob("*.safetensors") if p.is_file())
    for shard in shards:
        tensors.update(read_header(path / shard)[0])
    stable = {k: v for k, v in sorted(config.items()) if k not in VOLATILE_KEYS}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"\n{name}:{t.dtype}:{','.join(map(str, t.shape))}".encode())
    return BaseInfo(path, config, tensors, digest.hexdigest())


def check_adapter_fits(
    modules: dict[str, dict[str, TensorInfo]],
    base: BaseInfo,
    label: str,
    saved: dict[str, tuple[str, TensorInfo]] | None = None,
    modules_to_save: list[str] | None = None,
) -> None:
    """Raise IncompatibleBaseError unless every LoRA module exists in ``base`` with matching
    sizes, and so does every tensor the adapter saves whole (``saved``: base tensor name ->
    (adapter key, shape), from :func:`~adaptr.registry.adapter_dir.saved_tensors`).

    InvalidAdapterError if a module of ``base`` that the config's ``modules_to_save`` names
    has no saved copy: PEFT wraps it, finds no weights for it and fails to load the adapter.
    """
    if not base.tensors:
        return  # a pickle-only base: nothing we may read to compare against
    names = base.tensors
    for module, parts in sorted(modules.items()):
        weight = _find_weight(names, module)
        if weight is None:
            if module.split(".")[-1] in HEADS:  # absent from the files: tied to the embedding
                continue
            raise IncompatibleBaseError(
                f"{label} does not fit base {base.path}: the base has no module {module}; "
                f"pass the base the adapter was trained on with --base"
            )
        if base.quantized or len(weight.shape) < 2:
            continue
        a, b = parts["lora_A"].shape, parts["lora_B"].shape
        pair = (a[1], b[0]) if len(a) > 1 else None
        if pair not in ((weight.shape[1], weight.shape[0]), (weight.shape[0], weight.shape[1])):
            if pair is not None and pair[1] == weight.shape[1]:  # an embedding: [vocab, hidden]
                _check_vocab(base, label, f"{module}.weight", weight.shape[0], pair[0])
            if pair is not None and pair[0] == weight.shape[1]:  # an output head: [vocab, hidden]
                _check_vocab(base, label, f"{module}.weight", weight.shape[0], pair[1])
            raise IncompatibleBaseError(
                f"{label} does not fit base {base.path}: {module} is {list(weight.shape)} in the base "
                f"but the adapter expects in/out {list(pair or ())}; pass the right base with --base"
            )
    for name, (key, info) in sorted((saved or {}).items()):
        have = _find_tensor(base, name)
        if have is None:
            raise IncompatibleBaseError(
                f"{label} does not fit base {base.path}: it saves {key} whole, and the base has no "
                f"tensor {name} for it (PEFT would ignore it); pass the base the adapter was "
                "trained on with --base"
            )
        if base.quantized or have.shape == info.shape:
            continue
        if len(have.shape) == len(info.shape) == 2 and have.shape[1] == info.shape[1]:
            _check_vocab(base, label, name, have.shape[0], info.shape[0])
        raise IncompatibleBaseError(
            f"{label} does not fit base {base.path}: it saves {name} as {list(info.shape)} and the "
            f"base's is {list(have.shape)}; pass the base the adapter was trained on with --base"
        )
    _check_saved_modules(base, label, saved or {}, modules_to_save or [])


def _check_saved_modules(
    base: BaseInfo, label: str, saved: dict[str, tuple[str, TensorInfo]], wanted: list[str]
) -> None:
    if not wanted:
        return
    for name in sorted(base.tensors):  # PEFT wraps every module whose path ends with a name
        parts = name.split(".")
        for i in range(1, len(parts)):
            hit = next((m for m in wanted if ".".join(parts[:i]).endswith(m)), None)
            if hit is None or name in saved or any(k.endswith(f".{name}") for k in saved):
                continue
            raise InvalidAdapterError(
                f"{label}: its config's modules_to_save lists {hit!r}, and the weights hold no "
                f"copy of {name}: PEFT would fail to load it; re-save the adapter with "
                "PeftModel.save_pretrained"
            )


HEADS = ("lm_head", "embed_out", "output")
EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "embed_in", "tok_embeddings")


def _check_vocab(base: BaseInfo, label: str, name: str, rows: int, want: int) -> None:
    """Raise the resized-vocabulary refusal when ``name`` is the base's token embedding or
    output head ([vocab, hidden]) and the adapter needs ``want`` rows instead of ``rows``."""
    leaf = name.removesuffix(".weight").rpartition(".")[2]
    vocab = base.config.get("vocab_size")
    if rows == want or (leaf not in HEADS + EMBEDDINGS and rows != vocab):
        return
    raise IncompatibleBaseError(
        f"{label} was trained with a resized vocabulary of {want:,} tokens ({name} has {want:,} "
        f"rows) and base {base.path} has {rows:,}: pass --base a base whose embeddings were "
        f"resized to {want:,} tokens (resize_token_embeddings({want}), save_pretrained, then "
        "`adaptr base add`)"
    )


def _find_tensor(base: BaseInfo, name: str) -> TensorInfo | None:
    """The base's tensor ``name`` (as the model names its parameters), also found in a base
    saved without its LM wrapper, or a tied output head (its embedding's shape)."""
    names = base.tensors
    if name in names:
        return names[name]
    head, _, rest = name.partition(".")
    if rest and rest in names:
        return names[rest]
    module, _, param = name.rpartition(".")
    if module.rpartition(".")[2] in HEADS:  # absent from the files: tied to the embedding
        for key, info in sorted(names.items()):
            if key.endswith(tuple(f"{e}.{param}" for e in EMBEDDINGS)):
                return info
    return None


def _find_weight(names: dict[str, TensorInfo], module: str) -> TensorInfo | None:
    for key in (f"{module}.weight", f"{module}.base_layer.weight"):
        if key in names:
            return names[key]
    head, _, rest = module.partition(".")  # a base saved without its LM wrapper
    return names.get(f"{rest}.weight") if rest else None
