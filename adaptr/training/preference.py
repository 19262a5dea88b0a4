"""Preference tuning: DPO, ORPO and KTO with TRL's trainers + PEFT, into the registry.

The SFT path's plan, model loading (LoRA / QLoRA, a parent version continued), progress,
Ctrl-C, ``--resume`` and storing are :mod:`adaptr.training.trainer`'s; what differs is the
trainer, its config (the recipe's ``dpo`` / ``orpo`` / ``kto`` section, every field of
``trl.DPOConfig``, ``trl.experimental.orpo.ORPOConfig``, ``trl.KTOConfig``) and the data.

The reference policy is TRL's with PEFT, never a second copy of the base: continuing a
version (``--from NAME@N``), DPO and KTO compare against that version (a frozen copy of its
adapter, TRL's ``ref`` adapter, left out of what is stored); on the base, against the base
with the adapter disabled. ORPO has no reference.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptr.data.preference import PAIRED, PairRow, apply_max_length, counts, tokenize
from adaptr.data.sft import RECORD, LengthReport
from adaptr.errors import InvalidInputError, first_line
from adaptr.registry import Registry
from adaptr.training import steps
from adaptr.training.methods import config_class
from adaptr.training.recipe import Recipe

REWARDS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


def trainer_class(method: str) -> type:
    if method == "dpo":
        from trl import DPOTrainer

        return DPOTrainer
    if method == "kto":
        from trl import KTOTrainer

        return KTOTrainer
    from trl.experimental.orpo import ORPOTrainer

    return ORPOTrainer


def preference_config(method: str, section: dict[str, Any], output_dir: Path):
    """The method's TRL config: the recipe's fields, plus what this machine needs (CPU, precision)."""
    import torch

    kwargs: dict[str, Any] = {
        "report_to": "none", "disable_tqdm": True, **section, "output_dir": str(output_dir),
    }  # fmt: skip
    if not torch.cuda.is_available():
        kwargs.setdefault("use_cpu", True)
        kwargs.setdefault("bf16", False)
    elif not torch.cuda.is_bf16_supported():
        kwargs.setdefault("bf16", False)
        kwargs.setdefault("fp16", True)
    try:
        config = config_class(method)(**kwargs)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"invalid {method} setting: {first_line(e)}") from None
    _check_loss_type(method, config)
    return config


def _check_loss_type(method: str, config) -> None:
    """TRL checks ``loss_type`` only at the first step: an unknown one is refused here, from
    the choices the config field states."""
    import dataclasses
    import re

    f = {f.name: f for f in dataclasses.fields(config)}.get("loss_type")
    if f is None:
        return
    choices = f.metadata.get("choices")
    if not choices and "Possible values are" in f.metadata.get("help", ""):
        choices = re.findall(r"`'(\w+)'`", f.metadata["help"].split("If multiple")[0])
    given = config.loss_type if isinstance(config.loss_type, list) else [config.loss_type]
    unknown = [t for t in given if choices and t not in choices]
    if unknown:
        raise InvalidInputError(
            f"{method}.loss_type {unknown[0]!r} is not one of TRL's: {', '.join(choices)}"
        )


def _truncation(method: str, args) -> str:
    """Which end TRL keeps of an over-length sequence. ORPO keeps the whole prompt and cuts
    the answers to what is left: a pair whose prompt alone fills max_length has no answer
    token left (its averaged log-probability would be 0/0), so it is dropped as keep_start's."""
    if method == "orpo":
        return "keep_start"
    return getattr(args, "truncation_mode", None) or "keep_start"


def tokenized(p, tokenizer, split: str) -> list[PairRow]:
    dataset = p.data.train if split == "train" else p.data.eval
    return tokenize(dataset, tokenizer, p.data.kind, split)


def prepare(p, tokenizer, args, *, refuse: bool = True):
    """(train, eval, reports): the records TRL trains on, over-length pairs handled as the
    recipe's ``data.over_length`` says."""
    method, policy = p.recipe.method, p.recipe.data.over_length
    out, reports = [], []
    for split, dataset in (("train", p.data.train), ("eval", p.data.eval)):
        if dataset is None:
            out.append(None)
            continue
        rows = tokenized(p, tokenizer, split)
        keep, report = apply_max_length(
            rows, args.max_length, policy, split, truncation_mode=_truncation(method, args),
            refuse=refuse,
        )  # fmt: skip
        reports.append(report)
        if report.kept == 0 and refuse:
            raise InvalidInputError(
                f"all {report.records:,} {split} records were dropped: " + "; ".join(report.lines())
            )
        kept = set(keep)
        if len(kept) < len(dataset):
            dataset = dataset.filter(lambda r, kept=kept: r[RECORD] in kept)
        out.append(dataset.remove_columns([RECORD]))
    return out[0], out[1], reports


def _reference(method: str, p) -> str | None:
    if method == "orpo":
        return None  # odds ratio against the policy itself
    return p.parent.ref if p.parent else f"{p.base.key} (adapter disabled)"


def final_rewards(logs: list[dict[str, Any]], prefix: str = "") -> dict[str, float]:
    """The last logged value of each reward statistic (``rewards/margins`` …)."""
    out: dict[str, float] = {}
    for key in REWARDS:
        name = prefix + key
        value = next((h[name] for h in reversed(logs) if name in h), None)
        if value is not None:
            out[key] = float(value)
    return out


def _metrics(trainer, out, eval_ds, trainable: int, total: int, started: float) -> dict[str, Any]:
    logs = trainer.state.log_history
    m: dict[str, Any] = {
        "train_loss": out.training_loss, "steps": trainer.state.global_step,
        "epochs": trainer.state.epoch, "train_runtime_s": out.metrics.get("train_runtime"),
        "trainable_params": trainable, "total_params": total,
        "duration_s": round(time.time() - started, 3),
    }  # fmt: skip
    rewards = final_rewards(logs)
    if "rewards/accuracies" in rewards:
        m["reward_accuracy"] = rewards["rewards/accuracies"]
    if "rewards/margins" in rewards:
        m["reward_margin"] = rewards["rewards/margins"]
    tokens = getattr(trainer, "_total_train_tokens", None)  # DPO's and KTO's running count
    if tokens and out.metrics.get("train_runtime"):
        m["tokens"] = float(tokens)
        m["tokens_per_second"] = float(tokens) / out.metrics["train_runtime"]
    if eval_ds is not None:
        ev = trainer.evaluate()
        m["eval_loss"] = ev["eval_loss"]
        for key, name in (("reward_accuracy", "accuracies"), ("reward_margin", "margins")):
            if f"eval_rewards/{name}" in ev:
                m[f"eval_{key}"] = ev[f"eval_rewards/{name}"]
    return json.loads(json.dumps(m, default=float))


def _lineage_extra(p, trainer, reports: list[LengthReport]) -> dict[str, Any]:
    """What preference tuning adds to the version's lineage."""
    method, args = p.recipe.method, trainer.args
    loss = getattr(args, "loss_type", None)
    data = {
        "sha256": p.data.info["sha256"], "format": p.data.info["format"],
        **counts(p.data.records), "train_records": reports[0].kept,
    }  # fmt: skip
    if len(reports) > 1:
        data["eval_records"] = reports[1].kept
    final = final_rewards(trainer.state.log_history)
    return {
        "method": method, "parent": p.parent.ref if p.parent else None,
        "reference": _reference(method, p), "beta": float(args.beta),
        "loss_type": list(loss) if isinstance(loss, (list, tuple)) else loss,
        "data": data, "final": final,
    }  # fmt: skip


def _build(method: str, model, args, train_ds, eval_ds, tokenizer, peft_config, title):
    """(TRL's trainer for ``method``, its Ctrl-C callback)."""
    from adaptr.training.callbacks import StopOnInterrupt

    try:
        trainer = trainer_class(method)(
            model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
            processing_class=tokenizer, peft_config=peft_config,
        )  # fmt: skip
    except (ValueError, NotImplementedError) as e:
        raise InvalidInputError(f"cannot set up {method} training: {first_line(e)}") from None
    if title is not None:
        steps.show_progress(trainer, title)
    stop = StopOnInterrupt()
    trainer.add_callback(stop)
    return trainer, stop


def train_preference(
    recipe: Recipe | dict | str | Path,
    *,
    registry: Registry | None = None,
    resume: bool = False,
    restart: bool = False,
    keep_run: bool = False,
    progress: bool = True,
    on_note: Callable[[str], None] | None = None,
):
    """DPO, ORPO or KTO as ``recipe`` says (its ``method``), stored as the next version."""

    started = time.time()
    notes = steps.Notes(on_note)
    registry = registry or Registry()
    p = steps.plan(recipe, registry)
    method, name = p.recipe.method, p.recipe.name
    run_dir = registry.home / "runs" / name
    resume_from = steps.prepare_run_dir(run_dir, resume=resume, restart=restart, name=name)
    tokenizer, family = p.tokenizer()
    args = preference_config(method, p.recipe.args, run_dir)
    train_ds, eval_ds, reports = prepare(p, tokenizer, args)
    for report in reports:
        for line in report.lines():
            notes.say(line)
    model, peft_config = steps.training_model(p, family, registry, run_dir, notes)
    title = f"{method} {name}" if progress else None
    trainer, stop = _build(method, model, args, train_ds, eval_ds, tokenizer, peft_config, title)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    total -= sum(
        t.numel() for n, t in trainer.model.named_parameters() if ".ref." in n
    )  # TRL's copy
    notes.say(
        f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"
    )
    out = steps.run_training(trainer, stop, resume_from, name, run_dir)
    if not math.isfinite(out.training_loss):
        raise InvalidInputError(
            f"{method} training of {name} ended with a {out.training_loss} loss: its weights are "
            f"not stored (nothing was). Check the data's lengths against max_length and lower "
            f"the learning rate; the run is in {run_dir}"
        )
    metrics = _metrics(trainer, out, eval_ds, trainable, total, started)
    version = None
    if trainer.is_world_process_zero():
        if "ref" in getattr(trainer.model, "peft_config", {}):
            trainer.model.delete_adapter(
                "ref"
            )  # TRL's frozen reference: the parent, stored already
        data = steps.data_lineage(p.data.info, reports)
        lineage = steps.lineage_of(p, trainer, family, data, resume_from)
        lineage["method"] = method
        lineage["preference"] = _lineage_extra(p, trainer, reports)
        version = steps.store(registry, p, trainer, run_dir, lineage, metrics, notes)
        if not keep_run:
            shutil.rmtree(run_dir, ignore_errors=True)
    return steps.TrainResult(version, metrics, run_dir, list(notes))


# -- --preview ------------------------------------------------------------------------------


@dataclass
class PairExample:
    """One record as the trainer sees it: the prompt (context), and the answers compared
    (chosen and rejected; or KTO's completion with its label), all of whose tokens carry loss."""

    record: int
    split: str
    prompt: str
    answers: dict[str, str]  # chosen/rejected, or completion
    tokens: int
    loss_tokens: int
    label: bool | None = None
    cut_tokens: int = 0
    dropped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)


@dataclass
class PairPreview:
    """What ``train --method dpo|orpo|kto`` would train on."""

    method: str
    examples: list[PairExample]
    reports: list[LengthReport]
    notes: list[str] = field(default_factory=list)
    loss: str = "the answers' tokens (chosen and rejected); the prompt is context"

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "examples": [e.to_dict() for e in self.examples],
            "splits": [r.to_dict() for r in self.reports], "loss": self.loss, "notes": self.notes,
        }  # fmt: skip


def preview_pairs(p, count: int) -> PairPreview:
    """``count`` records decoded as TRL tokenizes them, with the counts; loads no weights."""
    import tempfile

    tokenizer, _ = p.tokenizer()
    method = p.recipe.method
    args = preference_config(method, p.recipe.args, Path(tempfile.gettempdir()) / "adaptr-preview")
    examples: list[PairExample] = []
    reports = []
    for split, dataset in (("train", p.data.train), ("eval", p.data.eval)):
        if dataset is None:
            continue
        rows = tokenized(p, tokenizer, split)
        _, report = apply_max_length(
            rows, args.max_length, p.recipe.data.over_length, split,
            truncation_mode=_truncation(method, args), refuse=False,
        )  # fmt: skip
        reports.append(report)
        for row in sorted(rows, key=lambda r: r.record)[: max(count - len(examples), 0)]:
            examples.append(_example(tokenizer, row, split, report, args.max_length))
    notes = [line for r in reports for line in r.lines()]
    loss = (
        PairPreview.loss
        if p.data.kind == PAIRED
        else "the completion's tokens; the prompt is context"
    )
    if method == "kto" and p.data.kind == PAIRED:
        loss = "chosen (desirable) and rejected (undesirable) completions, unpaired as TRL does"
    return PairPreview(method, examples, reports, notes, loss)


def _example(tokenizer, row: PairRow, split: str, report: LengthReport, max_length) -> PairExample:
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    names = ("chosen", "rejected") if len(row.answers) == 2 else ("completion",)
    over = row.record in report.over_length and max_length is not None
    return PairExample(
        record=row.record, split=split, prompt=decode(row.prompt_ids),
        answers={n: decode(a) for n, a in zip(names, row.answers, strict=True)},
        tokens=row.tokens, loss_tokens=sum(len(a) for a in row.answers), label=row.label,
        cut_tokens=row.tokens - max_length if over and report.policy == "truncate" else 0,
        dropped=row.record in report.dropped,
    )  # fmt: skip
