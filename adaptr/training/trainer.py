"""SFT training with TRL's SFTTrainer + PEFT LoRA/QLoRA, straight into the registry.

The usual PEFT + TRL workflow as one call: load the base (optionally 8-bit or 4-bit NF4 through
bitsandbytes, then ``prepare_model_for_kbit_training``), build the ``LoraConfig`` from the
model family's defaults and the recipe, format the data, run ``SFTTrainer``, and store the
adapter as the next version with its lineage. adaptr adds defaults, never different math:
the ``lora`` and ``sft`` sections reach PEFT and TRL unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptr.bases import FoundBase, load_model, load_tokenizer, resolve_base
from adaptr.data.sft import DataSplits, LengthReport, load_splits, prepare
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


def sft_config(sft: dict[str, Any], output_dir: Path):
    """The SFTConfig: the recipe's fields, plus the defaults this machine needs (CPU, precision)."""
    import torch
    from trl import SFTConfig

    kwargs: dict[str, Any] = {
        "report_to": "none",
        "disable_tqdm": True,
        **sft,
        "output_dir": str(output_dir),
    }
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("bf16", False)
    elif not torch.cuda.is_bf16_supported():
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("fp16", True)
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"invalid sft setting: {first_line(e)}") from None


class _Notes(list):
    """The notes of one run, each also told to ``on_note`` as it is made."""

    def __init__(self, on_note: Callable[[str], None] | None):
        super().__init__()
        self.on_note = on_note

    def say(self, message: str) -> None:
        self.append(message)
        if self.on_note is not None:
            self.on_note(message)


def train(
    recipe: Recipe | dict | str | Path,
    *,
    registry: Registry | None = None,
    resume: bool = False,
    restart: bool = False,
    keep_run: bool = False,
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a LoRA adapter as ``recipe`` says and store it as the next version of its name.

    ``on_note`` hears each note as it is made (what the data lost to max_length, before the
    model loads); all of them are also in the result's ``notes``.
    """
    if progress:
        from adaptr.runtime import quiet_libraries

        quiet_libraries()
    if _method(recipe) != "sft":  # DPO, ORPO, KTO: the same plan, model and store
        from adaptr.training.preference import train_preference

        return train_preference(
            recipe, registry=registry, resume=resume, restart=restart, keep_run=keep_run,
            progress=progress, on_note=on_note,
        )  # fmt: skip
    started = time.time()
    notes = _Notes(on_note)
    registry = registry or Registry()
    p = plan(recipe, registry)
    name = p.recipe.name
    run_dir = registry.home / "runs" / name
    resume_from = _prepare_run_dir(run_dir, resume=resume, restart=restart, name=name)
    tokenizer, family = p.tokenizer()
    args = sft_config(p.recipe.sft, run_dir)
    train_ds, eval_ds, reports = prepare(p.data, tokenizer, args, p.recipe.data.over_length)
    for report in reports:
        for line in report.lines():
            notes.say(line)
    model, peft_config = _model(p, family, registry, run_dir, notes)
    title = f"training {name}" if progress else None
    trainer, stop = _trainer(model, args, train_ds, eval_ds, tokenizer, peft_config, title)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    notes.say(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    out = _run(trainer, stop, resume_from, name, run_dir)
    metrics = _metrics(trainer, out, eval_ds, trainable, total, started)
    version = None
    if trainer.is_world_process_zero():
        lineage = _lineage(p, trainer, family, _data_lineage(p.data.info, reports), resume_from)
        version = _store(registry, p, trainer, run_dir, lineage, metrics, notes)
        if not keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    return TrainResult(version, metrics, run_dir, list(notes))


def _method(recipe: Recipe | dict | str | Path) -> str:
    """The recipe's training method, read without checking the rest."""
    if isinstance(recipe, Recipe):
        return recipe.method
    if isinstance(recipe, dict):
        return recipe.get("method") or "sft"
    return Recipe.from_yaml(recipe).method


def _model(p: Plan, family, registry: Registry, run_dir: Path, notes: _Notes):
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
        return _load_parent(model, registry, p.parent, run_dir), None
    from adaptr.training.lora import lora_config

    lora = dict(recipe.lora)
    targets = lora.pop("target_modules", None)
    peft_config, _ = lora_config(model, family=family, targets=targets, **lora)
    return model, peft_config


def _trainer(model, args, train_ds, eval_ds, tokenizer, peft_config, title: str | None):
    """(SFTTrainer over the prepared examples, its Ctrl-C callback); ``title``: the rich
    progress bar's, None for no bar."""
    from transformers import set_seed
    from trl import SFTTrainer

    from adaptr.data.sft import for_trainer
    from adaptr.training.callbacks import StopOnInterrupt

    trl_args = copy.copy(args)  # the examples carry their loss masks: TRL masks nothing again
    trl_args.assistant_only_loss, trl_args.completion_only_loss = False, None
    set_seed(args.seed)
    try:
        trainer = SFTTrainer(
            model=model, args=trl_args, train_dataset=for_trainer(train_ds),
            eval_dataset=for_trainer(eval_ds), processing_class=tokenizer, peft_config=peft_config,
        )  # fmt: skip
    except ValueError as e:
        raise InvalidInputError(f"cannot set up training: {first_line(e)}") from None
    if title is not None:
        _show_progress(trainer, title)
    stop = StopOnInterrupt()  # Ctrl-C ends the current step, then training
    trainer.add_callback(stop)
    return trainer, stop


def _show_progress(trainer, title: str) -> None:
    """The rich progress bar instead of transformers' tqdm bar and raw log dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from adaptr.training.callbacks import RichProgressCallback

    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)  # raw log dicts: the rich bar shows the loss
    trainer.add_callback(RichProgressCallback(title))


def _run(trainer, stop, resume_from: str | None, name: str, run_dir: Path):
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


def _lineage(p: Plan, trainer, family, data_info: dict, resume_from: str | None) -> dict:
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


def _store(
    registry: Registry, p: Plan, trainer, run_dir: Path, lineage: dict, metrics: dict, notes: _Notes
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


def _data_lineage(info: dict[str, Any], reports: list[LengthReport]) -> dict[str, Any]:
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


def _complete(checkpoint: Path) -> bool:
    """A checkpoint is whole once its trainer_state.json (written last) parses."""
    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
        return True
    except (OSError, ValueError):
        return False


def _prepare_run_dir(run_dir: Path, *, resume: bool, restart: bool, name: str) -> str | bool | None:
    found = run_dir.glob("checkpoint-*") if run_dir.is_dir() else []
    steps = {c: c.name.removeprefix("checkpoint-") for c in found if c.is_dir()}
    checkpoints = sorted(
        (c for c, step in steps.items() if step.isascii() and step.isdigit()),
        key=lambda c: int(steps[c]),
    )  # Trainer's own checkpoint-<step> folders; anything else there is not ours to judge
    if resume:
        whole = [c for c in checkpoints if _complete(c)]
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


def _load_parent(model, registry: Registry, parent: AdapterVersion, run_dir: Path):
    from peft import PeftModel

    from adaptr.registry.patterns import check_stored_config

    check_stored_config(parent.config, (n for n, _ in model.named_modules()), parent.ref)
    src = registry.export(parent.ref, run_dir / "parent", force=True)
    return PeftModel.from_pretrained(model, str(src), is_trainable=True)


def _metrics(trainer, out, eval_ds, trainable: int, total: int, started: float) -> dict[str, Any]:
    logs = trainer.state.log_history
    tokens = getattr(trainer, "_total_train_tokens", None)  # TRL's running count (non-pad tokens)
    if not tokens:
        tokens = next((float(h["num_tokens"]) for h in reversed(logs) if "num_tokens" in h), None)
    m: dict[str, Any] = {
        "train_loss": out.training_loss, "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch, "train_runtime_s": out.metrics.get("train_runtime"),
        "trainable_params": trainable, "total_params": total, "duration_s": round(time.time() - started, 3),
    }  # fmt: skip
    if tokens and out.metrics.get("train_runtime"):
        m["tokens"] = tokens
        m["tokens_per_second"] = tokens / out.metrics["train_runtime"]
    if eval_ds is not None:
        ev = trainer.evaluate()
        m["eval_loss"] = ev["eval_loss"]
        m["perplexity"] = math.exp(ev["eval_loss"]) if ev["eval_loss"] < 50 else float("inf")
    return json.loads(json.dumps(m, default=float))
