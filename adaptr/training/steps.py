"""The steps every training method shares: the plan (every check before anything heavy
loads), the run folder and its checkpoints, the model to train (the base wrapped in LoRA, or
the parent version to continue), the run with Ctrl-C and damaged checkpoints as one-line
errors, the lineage, and storing the result as the next version (a full disk included).

:mod:`~adaptr.training.trainer` (SFT) and :mod:`~adaptr.training.preference` (DPO, ORPO,
KTO) are built from them.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptr.bases import FoundBase, load_model, load_tokenizer, resolve_base
from adaptr.data.sft import DataSplits, LengthReport, load_splits
from adaptr.errors import (
    AdaptrError,
    ConflictError,
    InvalidInputError,
    NotFoundError,
    StorageFullError,
    brief,
    first_line,
)
from adaptr.registry import AdapterVersion, Registry, check_name
from adaptr.registry.refs import check_tag
from adaptr.runtime import library_versions
from adaptr.training.recipe import Recipe


class TrainingInterrupted(AdaptrError):
    """Ctrl-C during training: nothing was stored; checkpoints allow ``--resume``."""

    exit_code = 130


@dataclass
class TrainResult:
    """What a training run produced (``version`` is None on non-main processes)."""

    version: AdapterVersion | None
    metrics: dict[str, Any]
    run_dir: Path
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    """A checked recipe and what it resolved to, before anything heavy is loaded."""

    recipe: Recipe
    base: FoundBase
    parent: AdapterVersion | None
    data: DataSplits

    def tokenizer(self):
        """(tokenizer, family) of the base, as the recipe's base section says."""
        base = self.recipe.base
        return load_tokenizer(
            self.base.path, trust_remote_code=base.trust_remote_code, family=base.family
        )


def plan(recipe: Recipe | dict | str | Path, registry: Registry) -> Plan:
    """Every check that needs no model and no torch: recipe, name, tags, parent, base, data.

    Works on its own copy of ``recipe``, in this order: :meth:`Recipe.check`, the data
    (its kind says which tokens carry loss: :meth:`Recipe.settle_loss`), then
    :meth:`Recipe.check_settings`; the plan's recipe is what the version stores."""
    if isinstance(recipe, Recipe):
        recipe = copy.deepcopy(recipe)
    else:
        recipe = Recipe.from_yaml(recipe) if isinstance(recipe, (str, Path)) else Recipe(recipe)
    recipe.check()
    check_name(recipe.name)
    for t in recipe.tags:
        check_tag(t)
    parent = registry.get(recipe.parent) if recipe.parent else None
    base = resolve_base(recipe.base.path, registry)
    seed = 42 if recipe.args.get("seed") is None else int(recipe.args["seed"])
    data = load_splits(recipe.data, seed)
    from adaptr.data.preference import check_kind

    check_kind(recipe.method, data.kind, recipe.data.format)
    recipe.settle_loss(data.kind)
    recipe.check_settings()
    return Plan(recipe, base, parent, data)


class Notes(list):
    """The notes of one run, each also told to ``on_note`` as it is made."""

    def __init__(self, on_note: Callable[[str], None] | None):
        super().__init__()
        self.on_note = on_note

    def say(self, message: str) -> None:
        self.append(message)
        if self.on_note is not None:
            self.on_note(message)


def training_model(p: Plan, family, registry: Registry, run_dir: Path, notes: Notes):
    """(model, peft_config): the base loaded to train, with the parent version attached to
    continue (peft_config None), else the LoRA config to wrap it in."""
    recipe = p.recipe
    gc = bool(recipe.args.get("gradient_checkpointing", True))
    model = load_model(p.base.path, recipe.base, gradient_checkpointing=gc)
    if family is None:
        notes.say(
            f"no family claims model_type {brief(model.config.model_type)}: PEFT's default LoRA targets are used"
        )
    if p.parent is not None:
        if recipe.lora:
            notes.say(
                f"lora settings are ignored: training continues {p.parent.ref} with its own LoRA config"
            )
        return load_parent(model, registry, p.parent, run_dir), None
    from adaptr.training.lora import lora_config

    lora = dict(recipe.lora)
    targets = lora.pop("target_modules", None)
    peft_config, _ = lora_config(model, family=family, targets=targets, **lora)
    return model, peft_config


def show_progress(trainer, title: str) -> None:
    """The rich progress bar instead of transformers' tqdm bar and raw log dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from adaptr.training.callbacks import RichProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # raw log dicts: the rich bar shows the loss
    trainer.add_callback(RichProgressCallback(title))


def run_training(trainer, stop, resume_from: str | None, name: str, run_dir: Path):
    """trainer.train(), with Ctrl-C and an unreadable checkpoint as one-line errors."""
    try:
        with stop.catching_sigint():
            out = trainer.train(resume_from_checkpoint=resume_from)
    except KeyboardInterrupt:  # a second Ctrl-C
        raise _interrupted(name, trainer.state.global_step, run_dir) from None
    except Exception as e:
        if resume_from and _loading_checkpoint(e):
            raise InvalidInputError(
                f"checkpoint {resume_from} cannot be read ({type(e).__name__}: {first_line(e, 120)}); "
                "start over with --restart, or delete that folder to resume from an earlier checkpoint"
            ) from None
        raise
    if stop.requested:
        raise _interrupted(name, trainer.state.global_step, run_dir)
    return out


def lineage_of(p: Plan, trainer, family, data_info: dict, resume_from: str | None) -> dict:
    """What the version records of how it was made."""
    from adaptr.gguf import lineage as gguf_lineage

    lineage = {
        "base": p.base.key, "dataset": data_info, "recipe": p.recipe.to_dict(),
        "seed": trainer.args.seed, "family": family.name if family else None,
        "libraries": library_versions(), "resumed_from": str(resume_from) if resume_from else None,
        "parents": [p.parent.ref] if p.parent else [], "method": "sft",
        "log_history": json.loads(json.dumps(trainer.state.log_history, default=float)),
    }  # fmt: skip
    if base_gguf := gguf_lineage(p.recipe.base.path, p.base.path):
        lineage["base_gguf"] = base_gguf  # the GGUF's name, size and SHA-256
    return lineage


def store(
    registry: Registry, p: Plan, trainer, run_dir: Path, lineage: dict, metrics: dict, notes: Notes
) -> AdapterVersion:
    """Save the trained adapter and add it to the registry as the next version."""
    name, final = p.recipe.name, run_dir / "final"
    with _storing(name, p.base.key, final, run_dir, trainer.state.global_step):
        trainer.save_model(str(final))
        (final / "training_args.bin").unlink(missing_ok=True)  # a pickle: never stored
        version = registry.add(
            name, final, base=p.base.key, tags=p.recipe.tags, lineage=lineage, metrics=metrics,
            origin=f"adaptr train --data {lineage['dataset']['path']}",
        )  # fmt: skip
    for n in version.warnings:  # what the add said, less the files it skipped (none here)
        notes.say(n)
    return version


@contextmanager
def _storing(name: str, base: str | None, final: Path, run_dir: Path, steps: int) -> Iterator[None]:
    """A full disk while saving or storing the trained adapter: the run folder is kept and
    the one-line error says how to store what was trained once there is space."""
    from adaptr.registry.faults import is_full

    try:
        yield
    except Exception as e:
        if not is_full(e):
            raise
        saved = (final / "adapter_model.safetensors").is_file() and (
            final / "adapter_config.json"
        ).is_file()
        how = (
            f"the trained adapter is saved in {final}: free some space, then store it with "
            f"`adaptr add {name} {final}" + (f" --base {base}`" if base else "`")
            if saved
            else f"its checkpoints are kept in {run_dir}: free some space, then rerun the same "
            "`adaptr train` with --resume"
        )
        raise StorageFullError(
            f"no space left on the device while storing {name} after {steps} training step(s); "
            f"nothing was stored in the registry and {how}"
        ) from e


def data_lineage(info: dict[str, Any], reports: list[LengthReport]) -> dict[str, Any]:
    """The dataset's lineage, with the records that trained after max_length had its say."""
    info = copy.deepcopy(info)
    info["lengths"] = {r.split: r.to_dict() for r in reports}
    info["train_records"] = reports[0].kept
    if len(reports) > 1:
        info["eval"]["records"] = reports[1].kept
    return info


# Where transformers' Trainer reads a checkpoint back (weights, optimizer, scheduler, RNG,
# trainer state): an exception raised under one of these is a damaged checkpoint.
CHECKPOINT_LOADERS = {
    "_load_from_checkpoint", "_load_optimizer_and_scheduler", "_load_scaler", "_load_rng_state",
    "_load_callback_state", "load_from_json",
}  # fmt: skip


def _loading_checkpoint(exc: BaseException) -> bool:
    import traceback

    return any(
        frame.f_code.co_name in CHECKPOINT_LOADERS
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def _interrupted(name: str, step: int, run_dir: Path) -> TrainingInterrupted:
    return TrainingInterrupted(
        f"training of {name} interrupted at step {step}; the registry is unchanged. "
        f"Checkpoints (if any were saved) are in {run_dir}: continue with --resume"
    )


def checkpoint_complete(checkpoint: Path) -> bool:
    """A checkpoint is whole once its trainer_state.json (written last) parses."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def prepare_run_dir(run_dir: Path, *, resume: bool, restart: bool, name: str) -> str | bool | None:
    found = run_dir.glob("checkpoint-*") if run_dir.is_dir() else []
    steps = {c: c.name.removeprefix("checkpoint-") for c in found if c.is_dir()}
    checkpoints = sorted(
        (c for c, step in steps.items() if step.isascii() and step.isdigit()),
        key=lambda c: int(steps[c]),
    )  # Trainer's own checkpoint-<step> folders; anything else there is not ours to judge
    if resume:
        whole = [c for c in checkpoints if checkpoint_complete(c)]
        if not whole:
            raise NotFoundError(
                f"nothing to resume: no complete checkpoint of {name} in {run_dir}; start without --resume"
            )
        if int(os.environ.get("RANK", "0")) == 0:
            for partial in checkpoints[checkpoints.index(whole[-1]) + 1 :]:
                shutil.rmtree(partial)  # cut short by the interruption
        return str(whole[-1])
    if checkpoints and not restart:
        raise ConflictError(
            f"an earlier run of {name} left checkpoints in {run_dir}: pass --resume to continue it or --restart to discard them"
        )
    if int(os.environ.get("RANK", "0")) == 0:  # under accelerate launch, one process clears it
        shutil.rmtree(run_dir, ignore_errors=True)
    return None


def load_parent(model, registry: Registry, parent: AdapterVersion, run_dir: Path):
    from peft import PeftModel

    from adaptr.registry.patterns import check_stored_config

    check_stored_config(parent.config, (n for n, _ in model.named_modules()), parent.ref)
    src = registry.export(parent.ref, run_dir / "parent", force=True)
    return PeftModel.from_pretrained(model, str(src), is_trainable=True)
