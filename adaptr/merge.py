"""Merge adapters into their base: a standalone transformers model folder, no PEFT needed.

The base is always loaded in full precision. An adapter trained on a 4-bit or 8-bit base
is merged into the dequantized (full-precision) weights, never into quantized ones, and
``adaptr_merge.json`` in the output records which path was taken; load the result with a
``BitsAndBytesConfig`` to quantize it again.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptr.errors import ConflictError, InvalidInputError
from adaptr.registry import AdapterVersion, Registry
from adaptr.registry.atomic import check_path, refuse_in_home, replace_dir, work_folder
from adaptr.values import DTYPES

# PEFT methods that add virtual tokens instead of changing weights: nothing to merge
PROMPT_METHODS = ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "MULTITASK_PROMPT_TUNING", "CPT")
PROVENANCE = "adaptr_merge.json"


@dataclass
class MergeRecord:
    """Where a merged model came from, as ``adaptr_merge.json`` in it says."""

    refs: list[str]  # the versions merged, in order
    base: str | None  # the base they record
    base_path: str  # what was loaded as the base
    base_fingerprint: str | None
    dtype: str  # of the merged weights
    adapters_trained_on_quantized_base: list[str] | None  # e.g. ["4bit"]; None: none were
    path: str  # which path the merge took (full-precision or dequantized weights), in words
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _how(trained_on: list[str]) -> str:
    if not trained_on:
        return "merged into the full-precision base weights"
    return (
        f"the base was loaded in full precision (dequantized) and the adapters trained on a "
        f"{'/'.join(trained_on)} base were merged into those weights; load this model with "
        "BitsAndBytesConfig to quantize it again"
    )


def _check_mergeable(versions: Sequence[AdapterVersion]) -> None:
    """Refuse what PEFT's merge_and_unload cannot fold into the weights."""
    for v in versions:
        why = (
            f"it is a {v.peft_type} adapter (virtual tokens, not weight deltas)"
            if v.peft_type in PROMPT_METHODS
            else "it replicates layers (layer_replication), whose copies share tensors"
            if v.config.get("layer_replication")
            else None
        )
        if why:
            raise InvalidInputError(
                f"{v.ref} cannot be merged into its base: {why}; serve it with "
                "`adaptr generate` / adaptr.inference instead"
            )


def merge(
    registry: Registry,
    refs: Sequence[str],
    out: str | Path,
    *,
    base: str | None = None,
    dtype: str = "auto",
    force: bool = False,
) -> MergeRecord:
    """Merge ``refs`` (all into one base) and write the model to ``out``; returns where it
    came from (also written to ``adaptr_merge.json`` in it)."""
    from adaptr.bases import base_location, check_base_fits, load_base_model
    from adaptr.inference import attach, versions_on_one_base

    if dtype not in DTYPES:
        raise InvalidInputError(f"--dtype must be one of {', '.join(DTYPES)}")
    check_path(str(out), "--out")
    out = Path(out).expanduser()
    refuse_in_home(out, registry.home, "the merged model")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConflictError(f"{out} exists and is not empty; pass --force to replace it")
    versions = versions_on_one_base(registry, refs)
    _check_mergeable(versions)
    path = base_location(registry, versions[0], base)
    info = check_base_fits(registry, versions, path)
    if info is not None and info.quantized:
        raise InvalidInputError(
            f"base {path} is a quantized checkpoint: merging into quantized weights loses the adapter's precision; "
            "pass --base with the full-precision weights"
        )
    trained_on = sorted(
        {
            str(v.lineage.get("recipe", {}).get("base", {}).get("quantization", "none"))
            for v in versions
        }
        - {"none"}
    )
    started = time.time()
    model, tokenizer = load_base_model(path, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    with work_folder("merge", out.parent) as work:  # beside out: the result moves in by rename
        peft = attach(model, registry, versions, work / "adapters", checked=info is not None)
        names = [v.ref for v in versions]
        merged = peft.merge_and_unload(adapter_names=names, progressbar=False)
        staging = work / "model"
        merged.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        record = MergeRecord(
            refs=names,
            base=versions[0].base,
            base_path=path,
            base_fingerprint=versions[0].base_fingerprint,
            dtype=str(next(merged.parameters()).dtype).removeprefix("torch."),
            adapters_trained_on_quantized_base=trained_on or None,
            path=_how(trained_on),
            seconds=round(time.time() - started, 3),
        )
        (staging / PROVENANCE).write_text(json.dumps(record.to_dict(), indent=2) + "\n")
        replace_dir(staging, out)  # the old folder stays whole until the new one takes its place
    return record
