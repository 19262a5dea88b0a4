"""Load a base with registry adapters attached: one, or several stacked (all active at once).

Stacking sums the adapters' deltas at inference time, without combining them into a new
adapter (that is :mod:`adaptr.compose`). Also the shared attaching code for compose and merge;
finding and loading the base is :mod:`adaptr.bases`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptr.bases import (
    base_location,
    check_base_fits,
    check_fits,
    context_window,
    load_base_model,
    loaded_base,
)
from adaptr.errors import IncompatibleBaseError, InvalidInputError, brief, first_line
from adaptr.registry import AdapterVersion, Registry


def versions_on_one_base(registry: Registry, refs: Sequence[str]) -> list[AdapterVersion]:
    """Resolve refs, refusing adapters of different bases."""
    if not refs:
        raise InvalidInputError("give at least one adapter reference")
    versions = [registry.get(r) for r in refs]
    bases = {v.base or "" for v in versions}
    fingerprints = {v.base_fingerprint for v in versions if v.base_fingerprint}
    if len(bases) > 1 or len(fingerprints) > 1:
        listed = ", ".join(f"{v.ref} on {v.base or '(no base)'}" for v in versions)
        raise IncompatibleBaseError(
            f"the adapters are on different bases ({listed}); use adapters of one base"
        )
    return versions


def attach(
    model,
    registry: Registry,
    versions: Sequence[AdapterVersion],
    workdir: Path,
    *,
    trainable: bool = False,
    into=None,
    checked: bool = False,
):
    """A PeftModel with each version loaded as an adapter named by its ref (exports into workdir).

    ``into``: a PeftModel already wrapping ``model`` to load them into, instead of a new one.
    ``checked``: :func:`check_base_fits` already checked the versions against the base's files.
    """
    from peft import PeftModel

    from adaptr.registry.patterns import check_stored_config

    names = [n for n, _ in model.named_modules()]
    for v in versions:  # before PEFT's re.fullmatch sees a pattern it could hang on
        check_stored_config(v.config, names, v.ref)
    if not checked:
        loaded = loaded_base(model)
        for v in versions:
            check_fits(registry, v, loaded)
    peft = into
    for i, v in enumerate(versions):
        folder = registry.export(v.ref, workdir / v.ref.replace("@", "-"), force=True)
        try:
            if peft is None:
                peft = PeftModel.from_pretrained(
                    model, str(folder), adapter_name=v.ref, is_trainable=trainable
                )
            else:
                peft.load_adapter(str(folder), adapter_name=v.ref, is_trainable=trainable)
        except (ValueError, TypeError) as e:
            if into is not None or i == 0:  # not a stack of this call's: the caller says what
                raise
            others = ", ".join(w.ref for w in versions[:i])
            raise InvalidInputError(
                f"PEFT cannot stack {v.ref} on {others} ({first_line(e, 200)}): use them one at a time"
            ) from None
    return peft


# PEFT methods whose PeftModel.generate needs a task id per row (task_ids=…)
TASK_METHODS = {"POLY": "n_tasks", "MULTITASK_PROMPT_TUNING": "num_tasks"}
PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "CPT")


def check_stackable(versions: Sequence[AdapterVersion]) -> None:
    """Refuse, before loading anything, what PEFT cannot run: adapters of different PEFT
    methods stacked, a prompt-learning adapter stacked, and an adapter of several tasks
    (generate gives no task id to choose one)."""
    if len(versions) > 1:
        kinds = {v.peft_type for v in versions}
        if len(kinds) > 1:
            listed = ", ".join(f"{v.ref} is {v.peft_type}" for v in versions)
            raise InvalidInputError(
                f"PEFT stacks adapters of one method only ({listed}): use them one at a time"
            )
        if kinds & set(PROMPT_LEARNING):
            raise InvalidInputError(
                f"{versions[0].ref} is a {versions[0].peft_type} adapter, which PEFT runs alone: "
                "use one at a time"
            )
    for v in versions:
        field = TASK_METHODS.get(v.peft_type or "")
        tasks = v.config.get(field) if field else None
        if field and tasks not in (None, 1):
            raise InvalidInputError(
                f"{v.ref} is a {v.peft_type} adapter of {brief(tasks)} tasks ({field}), and "
                "adaptr generates without a task id to choose one: use PEFT's generate(task_ids=…)"
            )


def load(
    registry: Registry,
    refs: Sequence[str] | None = None,
    *,
    base: str | None = None,
    dtype: str = "auto",
):
    """(model, tokenizer, refs): the base with ``refs`` attached and all active (stacked).

    With no refs, the registry's active adapters are used (``adaptr switch``); they must be
    those of a single base. The tokenizer's chat template is the one they were trained with
    (:func:`chat_template`).
    """
    if not refs:
        active = {b: r for b, r in registry.active().items() if r}
        if len(active) != 1:
            raise InvalidInputError(
                "no adapter given and "
                + ("none is active" if not active else "several bases have active adapters")
                + ": name one, or `adaptr switch REF` first"
            )
        refs = next(iter(active.values()))
    versions = versions_on_one_base(registry, refs)
    check_stackable(versions)
    path = base_location(registry, versions[0], base)
    checked = check_base_fits(registry, versions, path) is not None
    model, tokenizer = load_base_model(path, dtype)
    template = chat_template(registry, versions, tokenizer, model.config)
    if template is not None:  # what --chat renders with: the template training used
        tokenizer.chat_template = template
    from adaptr.registry.atomic import work_folder

    with work_folder("load") as tmp:  # marked: a killed run's is removed by the next one
        peft = attach(model, registry, versions, tmp, checked=checked)
    names = [v.ref for v in versions]
    if len(names) == 1:
        peft.set_adapter(names[0])  # PeftModel's: prompt learning has no tuner to set it on
    else:
        peft.base_model.set_adapter(names)
    return peft.eval(), tokenizer, names


# where a saved tokenizer keeps its chat template (transformers 5: the .jinja file; before:
# a chat_template key in tokenizer_config.json, or chat_template.json beside a processor)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")
NO_TEMPLATE = (
    "has no chat template (none stored with the adapter, none in the base's tokenizer, and no "
    "model family gives one)"
)


def _default_template(value: Any) -> str | None:
    """A template string from a chat_template value: a string, or named templates (a list of
    {name, template} or a mapping) of which transformers renders "default"."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
    if isinstance(value, dict):
        value = value.get("default") or (next(iter(value.values())) if len(value) == 1 else None)
    return value if isinstance(value, str) and value.strip() else None


def folder_chat_template(path: str | Path) -> str | None:
    """The chat template a saved tokenizer in folder ``path`` has (its chat_template.jinja,
    chat_template.json or tokenizer_config.json, as transformers reads them), else None."""
    for name in TEMPLATE_FILES:
        file = Path(path) / name
        try:
            raw = file.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        found = _template_of(name, raw)
        if found:
            return found
    return None


def _template_of(name: str, raw: str) -> str | None:
    """The template in one of :data:`TEMPLATE_FILES` (``name``) holding ``raw``."""
    if name.endswith(".jinja"):
        return _default_template(raw)
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return _default_template(data.get("chat_template") if isinstance(data, dict) else None)


def stored_chat_template(registry: Registry, version: AdapterVersion) -> str | None:
    """The chat template stored with ``version`` (training saves the tokenizer it trained
    with beside the adapter: the base's template, the family's when the base had none, or
    ``sft.chat_template_path``'s), else None. Read through the registry's hash check."""
    names = {f.path for f in version.files}
    for name in TEMPLATE_FILES:
        if name not in names:
            continue
        raw = registry.read_checked(version, name).decode("utf-8", errors="replace")
        found = _template_of(name, raw)
        if found:
            return found
    return None


def family_template(version: AdapterVersion | None, config: Any) -> str | None:
    """The chat template of the model family training used (recorded in the version's
    lineage), else of the family that claims the base's config."""
    from adaptr.extend.catalog import families, family_for

    name = (version.lineage or {}).get("family") if version is not None else None
    family = families().get(name) if isinstance(name, str) else None
    if family is None:
        try:
            family = family_for(config)
        except Exception:  # a plugin failing to look it up: no family's template
            family = None
    return family.chat_template if family is not None else None


def chat_template(
    registry: Registry, versions: Sequence[AdapterVersion], tokenizer, config: Any
) -> str | None:
    """The chat template ``versions`` were trained with, as training picked it: the one
    stored with the version, else the base tokenizer's own, else the model family's
    (:func:`family_template`); None when there is none. Stacked versions stored with
    different templates are refused (InvalidInputError)."""
    stored = {v.ref: t for v in versions if (t := stored_chat_template(registry, v))}
    if len(set(stored.values())) > 1:
        raise InvalidInputError(
            f"the stacked adapters were trained with different chat templates "
            f"({', '.join(stored)}): generate with one of them, or without --chat"
        )
    if stored:
        return next(iter(stored.values()))
    own = _default_template(getattr(tokenizer, "chat_template", None))
    return own or family_template(versions[0] if versions else None, config)


def generate(
    model, tokenizer, prompt: str, *, max_new_tokens: int = 32, chat: bool = False, **kwargs: Any
) -> str:
    """Greedy (by default) completion of one prompt; ``chat`` applies the tokenizer's chat
    template (:func:`load` sets it to the one the adapters were trained with)."""
    import torch

    if chat:
        if not _default_template(getattr(tokenizer, "chat_template", None)):
            raise InvalidInputError(
                f"the model {NO_TEMPLATE}: generate without --chat, or add the adapter again "
                "from a folder holding the chat_template.jinja it was trained with"
            )
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise InvalidInputError("the prompt is empty: give some text to continue")
    window = context_window(model.config)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInputError(
            f"max_new_tokens must be a positive whole number, got {brief(max_new_tokens)}"
        )
    if window is not None and ids.shape[1] + max_new_tokens > window:
        raise InvalidInputError(
            f"the model reads at most {window} tokens and the prompt has {ids.shape[1]}: "
            f"ask for at most {max(window - ids.shape[1], 0)} new tokens"
        )
    kwargs.setdefault("do_sample", False)
    active = getattr(model, "active_peft_config", None)
    if active is not None and str(getattr(active.peft_type, "value", "")) in TASK_METHODS:
        kwargs.setdefault("task_ids", torch.zeros(ids.shape[0], dtype=torch.long))  # its one task
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            **kwargs,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
