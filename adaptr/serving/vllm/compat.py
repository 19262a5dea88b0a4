"""What vLLM cannot serve, said before deploying: pure checks on a stored version (no vLLM, no torch).

vLLM loads LoRA adapters only, with plain ``lora_A``/``lora_B`` pairs on linear layers. It
refuses (or, worse, silently ignores) DoRA magnitudes, whole modules saved beside the adapter
(``modules_to_save``), LoRA biases, trainable tokens and LoRA on the embeddings or the LM head,
and every adapter's rank must fit the server's ``--max-lora-rank``.
"""

from __future__ import annotations

from adaptr.errors import InvalidAdapterError

# module names whose LoRA vLLM does not apply (embeddings and the LM head, across families)
EMBEDDING_MODULES = ("embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "word_embeddings")
# the ranks vLLM accepts for --max-lora-rank (vllm/config/lora.py)
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# LoRA inits with which PEFT rewrites the base's weights when it loads the adapter (PiSSA,
# CorDA and OLoRA subtract the initial A·B; LoftQ and LoRA-GA replace or offset W): the
# saved A/B mean something only on those rewritten weights. Saved with PEFT's conversion
# (save_pretrained(path_initial_model_for_weight_conversion=…)) they are plain LoRA again.
REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def rewrites_base(config: dict) -> str | None:
    """The ``init_lora_weights`` of an adapter PEFT loads by rewriting the base, else None."""
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(REWRITING_INITS):
        return init
    return None


# LoRA variants (LoraConfig fields PEFT marks is_lora_variant): not plain LoRA math, or
# tensors of their own; vLLM implements none of them
LORA_VARIANTS = {
    "velora_config": "VeLoRA", "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
    "arrow_config": "Arrow", "use_bdlora": "BD-LoRA", "alora_invocation_tokens": "activated LoRA",
}  # fmt: skip


def rewrites_base_reason(config: dict) -> str | None:
    """Why an adapter cannot be served beside others on one unmodified base, or None."""
    if config.get("kasa_config"):
        return (
            "it is a KaSA adapter (kasa_config): PEFT truncates the base's weights when it loads "
            "it, which would change the base for every other adapter; use `adaptr generate` / "
            "`adaptr merge`, which load it through PEFT on a base of its own"
        )
    if config.get("layer_replication"):
        return (
            "it replicates the base's layers (layer_replication), so it runs on a deeper model "
            "than the base; use `adaptr generate`, which builds that model through PEFT"
        )
    init = rewrites_base(config)
    if init is None:
        return None
    return (
        f"it was initialised with {init} (init_lora_weights) and saved without conversion, so "
        "its A/B apply only to base weights PEFT rewrites when it loads it; re-save it with "
        "PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...) and add that, "
        "or use `adaptr generate` / `adaptr merge`, which load it through PEFT"
    )


def max_rank(config: dict) -> int:
    """The largest rank of any layer: ``r`` and every ``rank_pattern`` value."""
    ranks = [config.get("r") or 0]
    pattern = config.get("rank_pattern") or {}
    if isinstance(pattern, dict):
        ranks += [r for r in pattern.values() if isinstance(r, int)]
    return max(ranks)


def lora_rank_setting(rank: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds ``rank``."""
    for allowed in VLLM_RANKS:
        if rank <= allowed:
            return allowed
    return rank


def _targets_embeddings(config: dict, tensor_names) -> list[str]:
    found = set()
    for key in tensor_names:
        parts = key.split(".")
        if any(p.startswith("lora_embedding_") for p in parts):
            found.add(parts[-2] if parts[-1].startswith("lora_embedding_") else parts[-1])
        for i, p in enumerate(parts):
            if p in ("lora_A", "lora_B") and i and parts[i - 1] in EMBEDDING_MODULES:
                found.add(parts[i - 1])
    targets = config.get("target_modules")
    if isinstance(targets, list):
        found.update(t for t in targets if t in EMBEDDING_MODULES)
    return sorted(found)


def problems(config: dict, tensor_names=(), *, max_lora_rank: int | None = None) -> list[str]:
    """Why vLLM cannot serve an adapter with this ``adapter_config.json`` and these weight
    keys (an empty list: it can). ``max_lora_rank`` is the server's setting, if known."""
    out = []
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        return [f"it is a {peft_type or 'non-PEFT'} adapter; vLLM serves LoRA adapters only"]
    rewrites = rewrites_base_reason(config)
    if rewrites:
        out.append(rewrites)
    if config.get("use_dora") or any("lora_magnitude_vector" in k for k in tensor_names):
        out.append("it uses DoRA (use_dora), which vLLM does not implement")
    for field, name in LORA_VARIANTS.items():
        if config.get(field) and field not in ("kasa_config",):  # (KaSA: said above)
            out.append(f"it is a {name} adapter ({field}), which vLLM does not implement")
    if config.get("modules_to_save"):
        mods = config["modules_to_save"]
        mods = ", ".join(mods) if isinstance(mods, list) else str(mods)
        out.append(
            f"it saves whole modules beside the LoRA (modules_to_save: {mods}), which vLLM ignores"
        )
    if config.get("lora_bias") or any(k.endswith("lora_B.bias") for k in tensor_names):
        out.append("it trains LoRA biases (lora_bias), which vLLM does not load")
    if config.get("trainable_token_indices"):
        out.append("it trains token embeddings (trainable_token_indices), which vLLM does not load")
    embedded = _targets_embeddings(config, tensor_names)
    if embedded:
        out.append(
            f"it puts LoRA on the embeddings ({', '.join(embedded)}), which vLLM does not serve"
        )
    rank = max_rank(config)
    if max_lora_rank is not None and rank > max_lora_rank:
        out.append(
            f"its rank {rank} is above the server's --max-lora-rank {max_lora_rank}; "
            f"restart vLLM with --max-lora-rank {lora_rank_setting(rank)}"
        )
    return out


def version_problems(registry, version, *, max_lora_rank: int | None = None) -> list[str]:
    """:func:`problems` for a stored version (reads only its weights' header)."""
    from adaptr.errors import InvalidInputError
    from adaptr.registry.adapter_dir import WEIGHTS
    from adaptr.registry.patterns import adapter_names, check_stored_config
    from adaptr.registry.safetensors_header import read_header

    names: list[str] = []
    for f in version.files:
        if f.path == WEIGHTS:
            path = registry.blobs.path(f.sha256)
            if path.is_file():
                names = list(read_header(path)[0])
    found = problems(version.config, names, max_lora_rank=max_lora_rank)
    try:  # vLLM matches target_modules as a regex too: a stored pattern bomb is refused
        check_stored_config(version.config, adapter_names(names), version.ref)
    except InvalidInputError as e:
        found.append(str(e))
    return found


def check_servable(registry, version, *, max_lora_rank: int | None = None) -> None:
    """Raise InvalidAdapterError naming every reason vLLM cannot serve ``version``."""
    found = version_problems(registry, version, max_lora_rank=max_lora_rank)
    if found:
        raise InvalidAdapterError(f"vLLM cannot serve {version.ref}: {'; '.join(found)}")
