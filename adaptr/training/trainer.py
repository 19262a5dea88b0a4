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
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaptr.data.sft import prepare
from adaptr.errors import InvalidInputError, first_line
from adaptr.registry import Registry
from adaptr.training.recipe import Recipe
from adaptr.training.steps import (
    Notes,
    Plan,
    TrainingInterrupted,
    TrainResult,
    data_lineage,
    lineage_of,
    plan,
    prepare_run_dir,
    run_training,
    show_progress,
    store,
    training_model,
)

__all__ = ["Plan", "TrainResult", "TrainingInterrupted", "plan", "sft_config", "train"]


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
    notes = Notes(on_note)
    registry = registry or Registry()
    p = plan(recipe, registry)
    name = p.recipe.name
    run_dir = registry.home / "runs" / name
    resume_from = prepare_run_dir(run_dir, resume=resume, restart=restart, name=name)
    tokenizer, family = p.tokenizer()
    args = sft_config(p.recipe.sft, run_dir)
    train_ds, eval_ds, reports = prepare(p.data, tokenizer, args, p.recipe.data.over_length)
    for report in reports:
        for line in report.lines():
            notes.say(line)
    model, peft_config = training_model(p, family, registry, run_dir, notes)
    title = f"training {name}" if progress else None
    trainer, stop = _trainer(model, args, train_ds, eval_ds, tokenizer, peft_config, title)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    notes.say(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    out = run_training(trainer, stop, resume_from, name, run_dir)
    metrics = _metrics(trainer, out, eval_ds, trainable, total, started)
    version = None
    if trainer.is_world_process_zero():
        lineage = lineage_of(p, trainer, family, data_lineage(p.data.info, reports), resume_from)
        version = store(registry, p, trainer, run_dir, lineage, metrics, notes)
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
        show_progress(trainer, title)
    stop = StopOnInterrupt()  # Ctrl-C ends the current step, then training
    trainer.add_callback(stop)
    return trainer, stop


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
