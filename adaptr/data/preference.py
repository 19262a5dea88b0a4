"""Preference data for DPO, ORPO and KTO: formatted records, lengths, over-length handling.

Records are TRL's (https://huggingface.co/docs/trl/dataset_formats):

* preference (DPO, ORPO; KTO unpairs them): ``{"prompt", "chosen", "rejected"}``, standard
  (text) or conversational (lists of messages), the prompt always explicit here: an implicit
  prompt (whole conversations in ``chosen`` / ``rejected``) is split off as TRL's
  ``extract_prompt`` does, when the record is formatted;
* unpaired preference (KTO): ``{"prompt", "completion", "label"}``, ``label`` a boolean.

Formatters of these kinds (``Formatter(kind="preference" | "unpaired-preference")``) come
from :mod:`plugins.formatters` or any plugin. Lengths are counted with TRL's own
tokenization (``DPOTrainer`` / ``KTOTrainer`` preparation: the chat template, the EOS TRL
adds), and ``data.over_length`` acts on pairs as it does on SFT records: ``truncate`` leaves
the cut to TRL's collator (pairs whose prompt alone fills ``max_length`` keep nothing to
learn: they are dropped, and said), ``drop`` leaves over-length pairs out, ``refuse`` stops.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from adaptr.data import chat
from adaptr.data.files import text_value
from adaptr.data.sft import RECORD, LengthReport
from adaptr.errors import InvalidInputError, brief, first_line
from adaptr.extend.types import MissingField, need

PAIRED, UNPAIRED = "preference", "unpaired-preference"
KINDS = {"dpo": (PAIRED,), "orpo": (PAIRED,), "kto": (UNPAIRED, PAIRED)}
NEEDS = {
    "dpo": "preference pairs: prompt, chosen and rejected (e.g. --format preference)",
    "orpo": "preference pairs: prompt, chosen and rejected (e.g. --format preference)",
    "kto": "prompt, completion and a true/false label (--format kto), or preference pairs "
    "(--format preference, unpaired as TRL does)",
}
TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def check_kind(method: str, kind: str, fmt: str | None) -> None:
    """Refuse data of the wrong kind for ``method``, in one line naming what it needs."""
    if method == "sft":
        if kind in (PAIRED, UNPAIRED):
            what = "preference pairs" if kind == PAIRED else "unpaired preference data"
            raise InvalidInputError(
                f"the {fmt} format gives {what}, which SFT cannot learn from: train with "
                f"--method {'dpo (or orpo, kto)' if kind == PAIRED else 'kto'}"
            )
        return
    if kind not in KINDS[method]:
        raise InvalidInputError(
            f"--method {method} needs {NEEDS[method]}; the {fmt} format gives {kind} records"
        )


# -- formatters' building blocks ----------------------------------------------------------


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _answer(messages: list[dict[str, Any]], field: str) -> list[dict[str, Any]]:
    """A completion: assistant messages only (the whole completion is what is compared)."""
    if not messages:
        raise MissingField(field, "holds nothing after the prompt (no answer to compare)")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            raise MissingField(
                f"{field}[{i}]",
                f"is a {m['role']} message after the shared prompt: a completion holds the "
                "assistant's answer only",
            )
    return messages


def split_prompt(chosen: list, rejected: list, prompt: list | None) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) from conversations: the explicit prompt, or the messages
    both start with (TRL's implicit prompt), taken off the completions."""
    if prompt is None:
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        while n and chosen[n - 1]["role"] == "assistant":  # the answer starts at the last turn
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    else:
        for answer in (chosen, rejected):
            if answer[: len(prompt)] == prompt and len(answer) > len(prompt):
                answer[:] = answer[len(prompt) :]  # UltraFeedback: the prompt repeated
    if not prompt:
        raise MissingField("prompt", "is missing and chosen and rejected share no opening turns")
    return prompt, _answer(chosen, "chosen"), _answer(rejected, "rejected")


def _text_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's implicit text prompt: the longest shared prefix, ended at a word boundary."""
    from trl.data_utils import extract_prompt

    out = extract_prompt({"chosen": chosen, "rejected": rejected})
    if not out["prompt"].strip():
        raise MissingField("prompt", "is missing and chosen and rejected share no opening text")
    return out["prompt"], out["chosen"], out["rejected"]


def _scores(record: dict[str, Any]) -> None:
    """UltraFeedback's ``score_chosen`` / ``score_rejected``: a pair whose chosen answer
    scores below the rejected one is refused (it would teach the opposite preference)."""
    good, bad = record.get("score_chosen"), record.get("score_rejected")
    numbers = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in (good, bad))
    if good is not None and bad is not None and numbers and good < bad:
        raise MissingField(
            "score_chosen",
            f"({good}) is below score_rejected ({bad}): chosen and rejected are swapped",
        )


def preference(
    record: dict[str, Any], prompt_field: str, chosen_field: str, rejected_field: str
) -> dict[str, Any]:
    """TRL preference records, standard or conversational, with or without an explicit
    prompt; UltraFeedback's (a text prompt, chosen/rejected conversations that repeat it)."""
    chat.refuse_media(record)
    chosen, rejected = need(record, chosen_field, rejected_field)
    prompt = record.get(prompt_field)
    _scores(record)
    tools = chat.tools_json(record.get("tools"))
    if _is_chat(chosen) != _is_chat(rejected):
        raise MissingField(rejected_field, "must be the same shape as chosen (both text or both messages)")  # fmt: skip
    if not _is_chat(chosen):
        c, r = text_value(chosen, chosen_field), text_value(rejected, rejected_field)
        if prompt in (None, ""):
            p, c, r = _text_prompt(c, r)
        else:
            p = text_value(prompt, prompt_field)
        return pair_record(p, c, r, None)
    c, r = chat.message_list(chosen, chosen_field), chat.message_list(rejected, rejected_field)
    if isinstance(prompt, str) and prompt.strip():
        if c[0]["role"] == "user" and c[0] == r[0]:
            p = None  # UltraFeedback: the conversations open with the prompt
        else:
            p = [{"role": "user", "content": prompt}]
    else:
        p = chat.message_list(prompt, prompt_field) if prompt not in (None, "", []) else None
    p, c, r = split_prompt(c, r, p)
    return pair_record(p, c, r, tools)


def pair_record(prompt: Any, chosen: Any, rejected: Any, tools: str | None) -> dict[str, Any]:
    """The TRL preference record; refuses a pair with nothing to prefer."""
    if chosen == rejected:
        raise MissingField("rejected", "is the same as chosen: the pair prefers nothing")
    if isinstance(chosen, list):  # tool results named after their calls, as SFT does
        both = chat.conversation(prompt + chosen, tools, "chosen")["messages"]
        prompt = both[: len(prompt)]
    rec = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return {**rec, "tools": tools} if tools else rec


def pair_of(chosen_rec: dict[str, Any], rejected_rec: dict[str, Any]) -> dict[str, Any]:
    """A preference record from two SFT records that differ in their last answer (what an
    SFT formatter makes of a record with the chosen, then with the rejected answer)."""
    if "messages" in chosen_rec:
        c, r = chosen_rec["messages"], rejected_rec["messages"]
        p, c, r = split_prompt(list(c), list(r), None)
        return pair_record(p, c, r, chosen_rec.get("tools"))
    if chosen_rec.get("prompt") != rejected_rec.get("prompt"):
        raise MissingField("rejected", "gives another prompt than chosen")
    return pair_record(
        chosen_rec["prompt"], chosen_rec["completion"], rejected_rec["completion"], None
    )


def label_value(value: Any, field: str) -> bool:
    """A KTO label: true/false (also 1/0 and a CSV cell's 'true'/'false')."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise MissingField(
        field, f"must be true (desirable) or false (undesirable), got {brief(value)}"
    )


def unpaired(
    record: dict[str, Any],
    prompt_field: str,
    completion_field: str,
    label_field: str,
    messages_field: str = "messages",
) -> dict[str, Any]:
    """KTO's prompt/completion/label, text or lists of messages; or LLaMA-Factory's KTO
    layout: a conversation (``messages``) whose last assistant turn is the completion."""
    chat.refuse_media(record)
    if label_field not in record:
        raise MissingField(label_field, "is missing")
    label = label_value(record[label_field], label_field)
    tools = chat.tools_json(record.get("tools"))
    if record.get(prompt_field) is None and _is_chat(record.get(messages_field)):
        messages = chat.message_list(record[messages_field], messages_field)
        n = len(messages)
        while n and messages[n - 1]["role"] == "assistant":
            n -= 1
        if n == 0 or n == len(messages):
            raise MissingField(messages_field, "must end in the assistant's answer after a prompt")
        both = chat.conversation(messages, tools, messages_field)["messages"]
        rec = {"prompt": both[:n], "completion": both[n:], "label": label}
        return {**rec, "tools": tools} if tools else rec
    prompt, completion = need(record, prompt_field, completion_field)
    if _is_chat(prompt) != _is_chat(completion):
        raise MissingField(completion_field, f"must be the same shape as {prompt_field} (both text or both messages)")  # fmt: skip
    if not _is_chat(prompt):
        return {
            "prompt": text_value(prompt, prompt_field),
            "completion": text_value(completion, completion_field),
            "label": label,
        }
    p = chat.message_list(prompt, prompt_field)
    c = _answer(chat.message_list(completion, completion_field), completion_field)
    both = chat.conversation(p + c, tools, completion_field)["messages"]
    rec = {"prompt": both[: len(p)], "completion": both[len(p) :], "label": label}
    return {**rec, "tools": tools} if tools else rec


# -- lengths ---------------------------------------------------------------------------------


@dataclass
class PairRow:
    """One tokenized record: prompt, and the answers (chosen, rejected; or the completion)."""

    record: int
    prompt_ids: list[int]
    answers: list[list[int]]
    label: bool | None = None

    @property
    def tokens(self) -> int:
        """The longest sequence the trainer builds of it (prompt + its longest answer)."""
        return len(self.prompt_ids) + max(len(a) for a in self.answers)


def tokenize(dataset, tokenizer, kind: str, split: str = "train") -> list[PairRow]:
    """Every record tokenized as TRL's DPO (pairs) or KTO (unpaired) preparation does it,
    untruncated."""
    from trl import DPOTrainer, KTOTrainer

    chats = isinstance(dataset[0].get("prompt"), list)
    if chats and not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError(
            "the base's tokenizer has no chat template and no model family gives one: chat data "
            "needs one (pick a --family whose template fits, or give a text layout)"
        )
    paired = kind == PAIRED
    cls = DPOTrainer if paired else KTOTrainer
    view = SimpleNamespace(  # what TRL's preparation reads (KTO's weights: a check on unequal counts)
        _tokenizer=tokenizer, calculate_KL=False, desirable_weight=1.0, undesirable_weight=1.0
    )
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    try:
        out = cls._prepare_dataset(view, dataset, tokenizer, args, split)
    except (ValueError, TypeError, KeyError) as e:
        raise InvalidInputError(
            f"cannot tokenize the {split} data with the base's tokenizer: {brief(first_line(e), 200)}"
        ) from None
    numbers, prompts = out[RECORD], out["prompt_ids"]
    if paired:
        answers = [list(a) for a in zip(out["chosen_ids"], out["rejected_ids"], strict=True)]
        return [PairRow(n, p, a) for n, p, a in zip(numbers, prompts, answers, strict=True)]
    labels = out["label"]
    return [
        PairRow(n, p, [c], bool(label))
        for n, p, c, label in zip(numbers, prompts, out["completion_ids"], labels, strict=True)
    ]


def apply_max_length(
    rows: list[PairRow],
    max_length: int | None,
    policy: str,
    split: str = "train",
    *,
    truncation_mode: str | None = "keep_start",
    refuse: bool = True,
) -> tuple[list[int], LengthReport]:
    """The record numbers that train, and what ``max_length`` did (as SFT's report says it):
    ``truncate`` keeps over-length pairs for TRL to cut, except those whose prompt alone
    fills ``max_length`` (TRL would drop them: no answer token is left)."""  # fmt: skip
    lengths = [r.tokens for r in rows]
    report = LengthReport(split, len(rows), max_length, policy, longest=max(lengths, default=0))
    over = [r for r in rows if max_length is not None and r.tokens > max_length]
    report.over_length = sorted(r.record for r in over)
    drop: set[int] = set()
    if over and policy == "refuse" and refuse:
        raise InvalidInputError(
            f"{report.summary()}: raise --max-length, or set data.over_length to truncate or drop"
        )
    if over and policy == "drop":
        drop = {r.record for r in over}
    elif over and policy == "truncate" and truncation_mode != "keep_end":
        drop = {r.record for r in over if len(r.prompt_ids) >= max_length}
        report.emptied = sorted(drop)
    report.dropped = sorted(drop)
    kept = [r for r in rows if r.record not in drop]
    cap = max_length if policy == "truncate" and max_length is not None else None
    report.tokens = sum(min(r.tokens, cap) if cap else r.tokens for r in kept)
    report.loss_tokens = sum(
        sum(min(len(a), max(cap - len(r.prompt_ids), 0)) if cap else len(a) for a in r.answers)
        for r in kept
    )
    return [r.record for r in kept], report


def counts(records: list[dict[str, Any]]) -> dict[str, int]:
    """What lineage records of the data: pairs, or desirable/undesirable completions."""
    if records and "label" in records[0]:
        good = sum(bool(r["label"]) for r in records)
        return {"desirable": good, "undesirable": len(records) - good}
    return {"pairs": len(records)}
