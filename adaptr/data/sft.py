"""Training data as TRL will see it: formatted, split, tokenized, every record accounted for.

TRL's SFTTrainer truncates examples longer than ``max_length`` and drops those left without
a loss token, without a word. adaptr tokenizes first, with TRL's own preparation (so the
tokens and loss masks are exactly the ones training sees), applies the recipe's
``data.over_length`` policy, reports what it did, and hands TRL the prepared examples.
``adaptr train --preview`` shows the same examples without loading the model.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adaptr.errors import InvalidInputError, brief, first_line

RECORD = "adaptr_record"  # column: the record's number in the data file (1-based)
MODEL_COLUMNS = ("input_ids", "labels", "attention_mask", "token_type_ids", "mm_token_type_ids")
SPLITTING = ("bfd_split", "wrapped")  # packing strategies that split long examples, losing nothing


@dataclass
class DataSettings:
    """The recipe's ``data`` section: the records, their formatter, the eval set and the
    over-length policy; :func:`load_splits` reads it (the recipe's is
    checked in :meth:`adaptr.training.recipe.Recipe.check`)."""

    path: str | None = None
    format: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    eval_split: float | None = None
    eval_path: str | None = None
    limit: int | None = None
    over_length: str = "truncate"


@dataclass
class DataSplits:
    """Formatted records as datasets (with their record numbers) and what lineage records."""

    train: Any
    eval: Any | None
    info: dict[str, Any]
    kind: str
    records: list[dict[str, Any]] = field(default_factory=list)  # formatted, in file order


def load_splits(data: DataSettings, seed: int) -> DataSplits:
    """Format the data file(s) that ``data`` names and split off the eval set; ``seed``
    shuffles the split (``DataSettings(path=…, format=…)`` is enough: no eval set)."""
    from adaptr.data.files import kind_of, load_records, to_dataset
    from adaptr.extend.catalog import get_formatter
    from adaptr.registry.blobs import hash_file

    fmt = get_formatter(data.format)
    path = Path(data.path).expanduser()
    options = data.options or {}
    records = load_records(path, fmt, **options)
    if data.limit:
        records = records[: int(data.limit)]
    kind = kind_of(records)  # the records' own (alpaca with lang=chat gives chats)
    info: dict[str, Any] = {
        "path": str(path.resolve()), "sha256": hash_file(path)[0], "format": data.format,
        "options": options, "records": len(records),
    }  # fmt: skip
    train = to_dataset([{**r, RECORD: n} for n, r in enumerate(records, 1)])
    evaluation = None
    if data.eval_path:
        eval_path = Path(data.eval_path).expanduser()
        eval_records = load_records(eval_path, fmt, **options)
        if kind_of(eval_records) != kind:
            raise InvalidInputError(
                f"{eval_path} gives {kind_of(eval_records)} records but {path} gives {kind} records: "
                "give the eval data the training data's shape"
            )
        evaluation = to_dataset([{**r, RECORD: n} for n, r in enumerate(eval_records, 1)])
        info["eval"] = {
            "path": str(eval_path.resolve()),
            "sha256": hash_file(eval_path)[0],
            "records": len(evaluation),
        }
    elif data.eval_split:
        if len(records) < 2:
            raise InvalidInputError(
                f"{path} has {len(records)} record(s): too few to split off an eval set"
            )
        split = train.train_test_split(test_size=float(data.eval_split), seed=seed)
        train, evaluation = split["train"], split["test"]
        info["eval"] = {"split": float(data.eval_split), "records": len(evaluation)}
    info["train_records"] = len(train)
    return DataSplits(train, evaluation, info, kind, records)


def check_chat(splits: DataSplits, tokenizer, args) -> None:
    """Chat data only (messages, or conversational prompt-completion): the template renders
    what the records hold (tools, tool calls, every message, speakers' names) and the loss
    covers the assistant's text, found before anything trains.

    ``sft.chat_template_path`` (a .jinja file) replaces the tokenizer's template first, as
    SFTTrainer would, so that the examples are tokenized with it."""
    path = getattr(args, "chat_template_path", None)
    if path:
        if not str(path).endswith((".jinja", ".j2")) or not Path(path).is_file():
            raise InvalidInputError(
                f"sft.chat_template_path {brief(str(path))} is not a .jinja file: adaptr takes the "
                "chat template from a .jinja file"
            )
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
    from adaptr.data.chat import check_templates

    if splits.kind == "messages":
        check_templates(
            tokenizer, splits.records, assistant_only_loss=bool(args.assistant_only_loss)
        )
    elif splits.records and isinstance(splits.records[0].get("prompt"), list):
        # conversational prompt-completion: the template must render all of prompt + completion
        # (the loss is the completion's tokens, found by TRL as where the two renderings part)
        chats = (
            {"messages": r["prompt"] + r["completion"], **({"tools": r["tools"]} if r.get("tools") else {})}
            for r in splits.records
        )  # fmt: skip
        check_templates(tokenizer, chats, assistant_only_loss=False)


@dataclass(frozen=True)
class LossTokens:
    """Which tokens carry loss, as the ``sft`` settings of that name say it."""

    assistant_only_loss: Any = False
    completion_only_loss: Any = None  # None: TRL's choice (the completion, if there is one)

    @classmethod
    def of(cls, sft: Mapping[str, Any]) -> LossTokens:
        """What settled ``sft`` settings say (see :func:`loss_tokens`)."""
        return cls(sft.get("assistant_only_loss"), sft.get("completion_only_loss"))

    @property
    def carried_by(self) -> str:
        """``assistant``, ``completion`` or ``all``."""
        if self.assistant_only_loss:
            return "assistant"
        return "completion" if self.completion_only_loss else "all"

    def sft(self) -> dict[str, Any]:
        """The two ``sft`` settings (SFTConfig fields)."""
        return {
            "assistant_only_loss": self.assistant_only_loss,
            "completion_only_loss": self.completion_only_loss,
        }


def loss_tokens(kind: str, sft: Mapping[str, Any] | None = None) -> LossTokens:
    """Which tokens of ``kind`` records carry loss, where ``sft`` leaves it unset: assistant
    turns of chat data, the completion of prompt/completion data, every token of plain text.
    The one place this is decided (training stores it in the recipe; eval records it)."""
    sft = sft or {}
    if kind == "messages":
        assistant = sft.get("assistant_only_loss", True)
    elif sft.get("assistant_only_loss"):
        raise InvalidInputError(
            f"sft.assistant_only_loss needs chat data (a messages format); this format gives {kind} records"
        )
    else:
        assistant = sft.get("assistant_only_loss", False)
    if kind == "prompt-completion":
        completion = sft.get("completion_only_loss", True)
    else:
        completion = sft.get("completion_only_loss")
        completion = False if completion is None else completion
    return LossTokens(assistant, completion)


@dataclass
class LengthReport:
    """What ``max_length`` did to one split: which records were cut, dropped or split."""

    split: str
    records: int
    max_length: int | None
    policy: str
    over_length: list[int] = field(default_factory=list)  # record numbers, in file order
    dropped: list[int] = field(default_factory=list)
    emptied: list[int] = field(default_factory=list)  # truncation left no loss token
    split_across: bool = False  # packing splits long records instead of cutting them
    longest: int = 0
    tokens: int = 0
    loss_tokens: int = 0

    @property
    def kept(self) -> int:
        return self.records - len(self.dropped)

    def summary(self) -> str:
        """``N of M records exceed max_length=L tokens (longest …; records …)``."""
        what = self.split + " records" if self.split != "train" else "records"
        return (
            f"{len(self.over_length):,} of {self.records:,} {what} exceed max_length="
            f"{self.max_length} tokens (longest {self.longest:,}; {_numbers(self.over_length)})"
        )

    def lines(self) -> list[str]:
        """Notes for the user; nothing when every record fits."""
        if not self.over_length:
            return []
        head = self.summary()
        if self.split_across:
            return [f"{head}: packing splits them across sequences, nothing is cut"]
        if self.policy == "drop":
            return [f"{head}: dropped (data.over_length: drop)"]
        if self.policy == "refuse":
            return [f"{head}: training refuses them (data.over_length: refuse)"]
        line = (
            f"{head}: truncating (data.over_length: truncate; drop or refuse are the other choices)"
        )
        if self.emptied:
            line += (
                f"; {len(self.emptied):,} of them keep no token that carries loss and are dropped "
                f"({_numbers(self.emptied)})"
            )
        return [line]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("over_length", "dropped", "emptied"):
            d[key] = len(d[key])
        d["kept"] = self.kept
        return d


def _numbers(numbers: list[int], shown: int = 5) -> str:
    head = ", ".join(str(n) for n in numbers[:shown])
    more = f" and {len(numbers) - shown:,} more" if len(numbers) > shown else ""
    return f"record{'s' if len(numbers) > 1 else ''} {head}{more}"


def tokenize(dataset, tokenizer, args, split: str = "train"):
    """Tokens and labels (-100 where no loss) for every record, untruncated, as TRL makes them."""
    from trl import SFTTrainer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    sample = dataset[0]
    chat = "messages" in sample or "prompt" in sample and isinstance(sample["prompt"], list)
    template = getattr(tokenizer, "chat_template", None)
    if chat and not template:
        raise InvalidInputError(
            "the base's tokenizer has no chat template and no model family gives one: chat data "
            "needs one (set sft.chat_template_path to a .jinja file)"
        )
    chat_template = None
    if args.assistant_only_loss and not has_generation_markers(template):
        try:
            chat_template = get_training_chat_template(tokenizer)
        except (
            ValueError,
            NotImplementedError,
        ):  # a template TRL cannot patch: find turns ourselves
            return _masked_by_rendering(dataset, tokenizer, split)
    completion_only = args.completion_only_loss
    if completion_only is None:
        completion_only = "prompt" in sample and "completion" in sample
    trainer = SimpleNamespace(
        _tokenizer=tokenizer, chat_template=chat_template, completion_only_loss=completion_only
    )  # what TRL's preparation reads of its trainer
    view = copy.copy(args)
    view.max_length, view.packing, view.shuffle_dataset = None, False, False
    try:
        return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, view, False, None, split)
    except RuntimeError as e:
        if "no assistant tokens" in str(e):
            raise InvalidInputError(
                "a chat record renders with no assistant tokens under the base's chat template "
                "(its {% generation %} markers do not cover assistant turns); fix the template or "
                "set sft.assistant_only_loss=false"
            ) from None
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidInputError(
            f"cannot tokenize the {split} data with the base's tokenizer: {brief(first_line(e), 200)}"
        ) from None


class _NotPrefix(Exception):
    pass


def _masked_by_rendering(dataset, tokenizer, split: str):
    """Assistant-only labels for a chat template without ``{% generation %}`` markers: each
    assistant turn is the part that rendering up to it adds to rendering the prompt before it."""
    try:
        return dataset.map(_mask_record, fn_kwargs={"tokenizer": tokenizer}, desc=None)
    except _NotPrefix as e:
        raise InvalidInputError(
            f"the base's chat template has no {{% generation %}} markers and renders {split} record "
            f"{e} differently turn by turn, so assistant turns cannot be found: train on every token "
            "with --set sft.assistant_only_loss=false, or give a template with the markers "
            "(sft.chat_template_path)"
        ) from None


def _mask_record(example: dict[str, Any], tokenizer) -> dict[str, Any]:
    import json

    from trl.data_utils import _tokenize, common_prefix_length

    tools = example.get("tools")
    kwargs = {"tools": json.loads(tools) if isinstance(tools, str) else tools} if tools else {}

    def ids(messages: list, **more: Any) -> list[int]:
        return _tokenize(tokenizer, messages, **kwargs, **more)["input_ids"] if messages else []

    messages = example["messages"]
    full = ids(messages)
    labels = [-100] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = ids(messages[: i + 1])
        if full[: len(upto)] != upto:
            raise _NotPrefix(example.get(RECORD, "?"))
        start = common_prefix_length(ids(messages[:i], add_generation_prompt=True), upto)
        labels[start : len(upto)] = upto[start:]
    return {"input_ids": full, "labels": labels}


def _counts(dataset) -> tuple[list[int], list[int]]:
    """Tokens and loss tokens per row, computed in Arrow (no Python list per row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if dataset._indices is not None:
        dataset = dataset.flatten_indices()
    n = len(dataset)
    ids = pa.concat_arrays(dataset.data.column("input_ids").chunks)
    labels = pa.concat_arrays(dataset.data.column("labels").chunks)
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    carries = pc.not_equal(labels.flatten(), -100).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(labels).to_numpy(zero_copy_only=False)
    loss = np.bincount(parents, weights=carries, minlength=n).astype(int)
    return lengths.astype(int).tolist(), loss.tolist()


def apply_max_length(dataset, args, policy: str, split: str = "train", *, refuse: bool = True):
    """Cut, drop or refuse records longer than ``args.max_length``; returns (dataset, report)."""
    lengths, loss = _counts(dataset)
    numbers = dataset[RECORD]
    max_length = args.max_length
    report = LengthReport(split, len(dataset), max_length, policy, longest=max(lengths, default=0))
    over = [i for i, n in enumerate(lengths) if max_length is not None and n > max_length]
    report.over_length = sorted(numbers[i] for i in over)
    report.split_across = bool(args.packing) and args.packing_strategy in SPLITTING
    drop: set[int] = set()
    if over and not report.split_across:
        if policy == "refuse":
            if refuse:
                raise InvalidInputError(
                    f"{report.summary()}: raise --max-length, or set data.over_length to "
                    "truncate or drop"
                )
        elif policy == "drop":
            drop = set(over)
        else:
            keep_end = args.truncation_mode == "keep_end"
            cut = slice(-max_length, None) if keep_end else slice(None, max_length)
            rows = dataset.select(over)["labels"]
            emptied = {
                i
                for i, labels in zip(over, rows, strict=True)
                if all(t == -100 for t in labels[cut])
            }
            drop = emptied
            report.emptied = sorted(numbers[i] for i in emptied)
            dataset = _truncate(dataset, set(over), cut)
            lengths, loss = _counts(dataset)
    report.dropped = sorted(numbers[i] for i in drop)
    if drop:
        dataset = dataset.select([i for i in range(len(dataset)) if i not in drop])
    report.tokens = sum(n for i, n in enumerate(lengths) if i not in drop)
    report.loss_tokens = sum(c for i, c in enumerate(loss) if i not in drop)
    return dataset, report


def _truncate(dataset, rows: set[int], cut: slice):
    columns = [c for c in MODEL_COLUMNS if c in dataset.column_names]

    def shorten(batch, indices):
        return {
            c: [v[cut] if i in rows else v for v, i in zip(batch[c], indices, strict=True)]
            for c in columns
        }

    return dataset.map(shorten, with_indices=True, batched=True, desc=None)


def for_trainer(dataset):
    """Only what the model takes: TRL sees prepared examples and tokenizes nothing again."""
    if dataset is None:
        return None
    return dataset.select_columns([c for c in MODEL_COLUMNS if c in dataset.column_names])


def prepare(splits: DataSplits, tokenizer, args, policy: str):
    """Tokenize both splits, apply the over-length policy; returns (train, eval, reports)."""
    check_chat(splits, tokenizer, args)
    train = tokenize(splits.train, tokenizer, args, "train")
    train, train_report = apply_max_length(train, args, policy, "train")
    reports = [train_report]
    if train_report.kept == 0:
        raise InvalidInputError(
            f"all {train_report.records:,} training records were dropped: "
            + "; ".join(train_report.lines())
        )
    evaluation = None
    if splits.eval is not None:
        evaluation = tokenize(splits.eval, tokenizer, args, "eval")
        evaluation, eval_report = apply_max_length(evaluation, args, policy, "eval")
        reports.append(eval_report)
        if eval_report.kept == 0:
            raise InvalidInputError(
                f"all {eval_report.records:,} eval records were dropped: "
                + "; ".join(eval_report.lines())
            )
    return train, evaluation, reports
