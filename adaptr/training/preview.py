"""``adaptr train --preview``: the examples as the model will see them, before any training.

Runs the trainer's own checks and data preparation (formatting, chat template, TRL's
tokenization, loss masks, the over-length policy) with the base's tokenizer only: no model
weights are loaded, nothing is stored.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptr.data.sft import (
    RECORD,
    LengthReport,
    LossTokens,
    apply_max_length,
    check_chat,
    tokenize,
)
from adaptr.registry import Registry
from adaptr.training.recipe import Recipe


@dataclass
class Segment:
    """A run of text whose tokens all carry loss, or all do not."""

    text: str
    loss: bool


@dataclass
class PreviewExample:
    """One record as training sees it: its text split into loss / no-loss runs."""

    record: int
    split: str
    tokens: int
    loss_tokens: int
    segments: list[Segment]
    cut_tokens: int = 0  # tokens past max_length that truncation removes
    cut_side: str = "end"  # where they are cut from (sft.truncation_mode keep_start: the end)
    dropped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "record": self.record, "split": self.split, "tokens": self.tokens,
            "loss_tokens": self.loss_tokens, "cut_tokens": self.cut_tokens, "cut_side": self.cut_side,
            "dropped": self.dropped,
            "segments": [{"text": s.text, "loss": s.loss} for s in self.segments],
        }  # fmt: skip


@dataclass
class Preview:
    """What ``train`` would train on: sample examples, per-split counts, the loss settings."""

    examples: list[PreviewExample]
    reports: list[LengthReport]
    loss: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "examples": [e.to_dict() for e in self.examples],
            "splits": [r.to_dict() for r in self.reports],
            "loss": self.loss,
            "notes": self.notes,
        }


def preview(
    recipe: Recipe | dict | str | Path, *, registry: Registry | None = None, count: int = 3
) -> Preview:
    """Prepare the data exactly as ``train`` would and return ``count`` examples and the counts."""
    from adaptr.runtime import quiet_libraries
    from adaptr.training.trainer import plan, sft_config

    quiet_libraries()
    p = plan(recipe, registry or Registry())
    if p.recipe.method != "sft":
        from adaptr.training.preference import preview_pairs

        return preview_pairs(p, count)  # chosen and rejected side by side
    tokenizer, _ = p.tokenizer()
    args = sft_config(p.recipe.sft, Path(tempfile.gettempdir()) / "adaptr-preview")
    policy = p.recipe.data.over_length
    check_chat(p.data, tokenizer, args)
    examples: list[PreviewExample] = []
    reports = []
    for split, dataset in (("train", p.data.train), ("eval", p.data.eval)):
        if dataset is None:
            continue
        tokenized = tokenize(dataset, tokenizer, args, split)
        _, report = apply_max_length(tokenized, args, policy, split, refuse=False)
        reports.append(report)
        if len(examples) < count:
            examples += _examples(tokenized, tokenizer, args, report, count - len(examples))
    return Preview(examples, reports, _loss_setting(p.recipe.sft), _notes(reports))


LOSS_SETTINGS = {
    "assistant": "assistant turns only (sft.assistant_only_loss: true)",
    "completion": "the completion only (sft.completion_only_loss: true)",
    "all": "every token",
}


def _loss_setting(sft: dict[str, Any]) -> str:
    return LOSS_SETTINGS[LossTokens.of(sft).carried_by]


def _notes(reports: list[LengthReport]) -> list[str]:
    lines = [line for r in reports for line in r.lines()]
    return lines + [
        f"all {r.records:,} {r.split} records would be dropped: training would stop"
        for r in reports
        if r.kept == 0
    ]


def _examples(dataset, tokenizer, args, report: LengthReport, count: int) -> list[PreviewExample]:
    numbers = dataset[RECORD]
    rows = sorted(range(len(dataset)), key=lambda i: numbers[i])[:count]
    out = []
    for i in rows:
        row = dataset[i]
        ids, labels = row["input_ids"], row["labels"]
        cut = 0
        if (
            row[RECORD] in report.over_length
            and not report.split_across
            and report.policy == "truncate"
        ):
            cut = len(ids) - args.max_length
        out.append(
            PreviewExample(
                record=row[RECORD],
                split=report.split,
                tokens=len(ids),
                loss_tokens=sum(t != -100 for t in labels),
                segments=segments(tokenizer, ids, labels),
                cut_tokens=cut,
                dropped=row[RECORD] in report.dropped,
                cut_side="start" if args.truncation_mode == "keep_end" else "end",
            )  # fmt: skip
        )
    return out


def segments(tokenizer, ids: list[int], labels: list[int]) -> list[Segment]:
    """The decoded text in runs of loss / no-loss tokens (decoded by prefix, so that
    multi-byte characters split across tokens come out whole)."""
    bounds = [0] + [k for k in range(1, len(ids)) if (labels[k] != -100) != (labels[k - 1] != -100)]
    bounds.append(len(ids))
    out, done = [], ""
    for start, end in zip(bounds, bounds[1:], strict=False):
        text = tokenizer.decode(ids[:end], skip_special_tokens=False)
        same = len(os.path.commonprefix([done, text]))  # a split character completes later
        out.append(Segment(text[same:], labels[start] != -100))
        done = text
    return [s for s in out if s.text]
