"""Compose adapters into a new registered version with PEFT's ``add_weighted_adapter``.

What PEFT does silently wrong is handled or refused here, each case shown by a test:
- rsLoRA: the combined adapter inherits ``use_rslora`` from the first one, although the
  per-adapter scalings are already folded into its weights (its alpha is set to its rank),
  so it would be scaled by sqrt(r) once more. adaptr switches rsLoRA off on the result.
- DoRA: magnitude vectors are not combined (they would be dropped or re-initialised):
  refused; merge DoRA adapters into the base with ``adaptr merge`` instead.
- differing alphas: handled by PEFT (each adapter's scaling is folded into its weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from adaptr.errors import InvalidInputError, brief
from adaptr.registry import AdapterVersion, Registry, check_name
from adaptr.registry.atomic import work_folder
from adaptr.values import is_number

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def check(
    versions: Sequence[AdapterVersion],
    weights: Sequence[float],
    method: str,
    options: dict[str, Any],
) -> None:
    """Every constraint, up front, with a reason."""
    if method not in METHODS:
        raise InvalidInputError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if not all(is_number(w) for w in weights):
        raise InvalidInputError(
            f"weights must be finite numbers (--weights), got {brief(list(weights))}"
        )
    if len(weights) != len(versions):
        raise InvalidInputError(
            f"{len(weights)} weight(s) for {len(versions)} adapter(s): give one weight per adapter"
        )
    if len(versions) < 2 and method != "linear":
        raise InvalidInputError(
            f"method {method} combines several adapters: give two or more (or use linear to rescale one)"
        )
    density = options.get("density")
    if density is not None and not 0 < float(density) <= 1:
        raise InvalidInputError(f"density must be in (0, 1], got {density}")
    if method in NEEDS_DENSITY and density is None:
        raise InvalidInputError(
            f"method {method} needs --density (the fraction of weights kept, e.g. 0.5)"
        )
    for v in versions:
        if v.peft_type != "LORA":
            raise InvalidInputError(
                f"{v.ref} is a {v.peft_type} adapter: only LoRA adapters can be composed"
            )
        if v.summary.get("use_dora"):
            raise InvalidInputError(
                f"{v.ref} uses DoRA, whose magnitude vectors PEFT's add_weighted_adapter cannot combine; "
                "merge DoRA adapters into the base with `adaptr merge` instead"
            )
    ranks = {v.ref: _max_rank(v) for v in versions}
    if method in SAME_RANK and len(set(ranks.values())) > 1:
        listed = ", ".join(f"{ref}: r={r}" for ref, r in ranks.items())
        raise InvalidInputError(
            f"method {method} needs adapters of equal rank ({listed}); use cat or svd"
        )
    kinds = {type(v.target_modules).__name__ for v in versions}
    if len(kinds) > 1:
        raise InvalidInputError(
            "the adapters mix a regex target_modules with a list; PEFT cannot combine those"
        )
    saved = [v.ref for v in versions if v.summary.get("modules_to_save")]
    if len(saved) > 1:
        raise InvalidInputError(
            f"{', '.join(saved)} each train full modules (modules_to_save), which cannot be combined"
        )


def _max_rank(v: AdapterVersion) -> int:
    pattern = v.summary.get("rank_pattern") or {}
    return max([v.r or 0, *pattern.values()])


def compose(
    registry: Registry,
    refs: Sequence[str],
    weights: Sequence[float],
    method: str,
    name: str,
    *,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_rank: int | None = None,
    base: str | None = None,
    tags: Sequence[str] = (),
) -> AdapterVersion:
    """Combine ``refs`` with ``weights`` by ``method`` and store the result as ``name``'s next version."""
    from adaptr.bases import base_location, load_base_model
    from adaptr.inference import attach, versions_on_one_base

    check_name(name)
    versions = versions_on_one_base(registry, refs)
    options = {
        "density": density,
        "majority_sign_method": majority_sign_method,
        "svd_rank": svd_rank,
    }
    check(versions, [float(w) for w in weights], method, options)
    model, _ = load_base_model(base_location(registry, versions[0], base), "float32")
    with work_folder("compose") as work:  # a killed run's folder is removed by the next one
        peft = attach(model, registry, versions, work)
        names = [v.ref for v in versions]
        kwargs: dict[str, Any] = {"combination_type": method}
        if density is not None:
            kwargs["density"] = float(density)
        if method in ("ties", "dare_ties"):
            kwargs["majority_sign_method"] = majority_sign_method
        if method == "svd" and svd_rank:
            kwargs["svd_rank"] = int(svd_rank)
        peft.add_weighted_adapter(
            names, [float(w) for w in weights], adapter_name="composed", **kwargs
        )
        _fix_rslora(peft, "composed")
        peft.save_pretrained(str(work / "out"), selected_adapters=["composed"])
        lineage = {
            "method": "compose", "combination": method, "parents": names, "weights": [float(w) for w in weights],
            "options": {k: val for k, val in options.items() if val is not None and (k != "majority_sign_method" or method in ("ties", "dare_ties"))},
            "base": versions[0].base,
        }  # fmt: skip
        return registry.add(
            name, work / "out" / "composed", base=versions[0].base, tags=tags, lineage=lineage,
            origin=f"adaptr compose {' '.join(names)} --method {method}",
        )  # fmt: skip


def _fix_rslora(peft, adapter: str) -> None:
    """The combined weights already carry each parent's scaling: the result must scale by 1."""
    from peft.tuners.lora import LoraLayer

    config = peft.peft_config[adapter]
    if not config.use_rslora:
        return
    config.use_rslora = False
    for module in peft.modules():
        if isinstance(module, LoraLayer) and adapter in module.scaling:
            module.scaling[adapter] = config.lora_alpha / config.r
