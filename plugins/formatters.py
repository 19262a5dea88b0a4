"""Built-in dataset formatters: text, alpaca, dolly, sharegpt, messages, prompt-completion, translation.

The chat formats (sharegpt, messages, and prompt-completion given lists of messages) read
content parts, tool calls, tool results and tool lists through :mod:`adaptr.data.chat`, and
refuse images, audio and video.

Which TRL dataset types train, and how (TRL's names, https://huggingface.co/docs/trl/dataset_formats):

* language modelling: ``text`` (standard), ``messages`` / ``sharegpt`` (conversational);
* prompt-completion: ``prompt-completion`` with text (standard) or with lists of messages
  (conversational: the chat template renders the prompt, then prompt + completion, and the
  loss is on the completion, as SFTTrainer does), ``alpaca``/``dolly``/``translation``;
* prompt-only, preference (``chosen``/``rejected``, LLaMA-Factory's ranking ``output``
  lists), unpaired preference (a boolean ``label``, LLaMA-Factory's KTO data) and stepwise
  supervision (``completions`` + ``labels``) are refused by name: SFT would learn nothing,
  or the rejected answers, from them.

Fields are text where text is expected (:func:`adaptr.data.files.text_value`): a list, an object, a
boolean, a float or NaN is refused with the field's name, never trained as its ``str()``.
"""

from __future__ import annotations

from typing import Any

from adaptr import Formatter, hookimpl
from adaptr.data import chat, preference
from adaptr.data.files import text_value
from adaptr.errors import InvalidInputError, brief
from adaptr.extend.types import MissingField, need

ALPACA = {
    # Chinese headings
    "zh": (
        "### 指令:\n{instruction}\n\n### 输入:\n{input}\n\n### 回答:\n",
        "### 指令:\n{instruction}\n\n### 回答:\n",
    ),
    # Stanford Alpaca's
    "en": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
    ),
}
LANGUAGES = {"zh": "Chinese", "en": "English", "ja": "Japanese", "ko": "Korean", "fr": "French",
             "de": "German", "es": "Spanish", "ru": "Russian", "it": "Italian", "pt": "Portuguese"}  # fmt: skip
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system",
                  "observation": "tool", "tool": "tool"}  # fmt: skip


SFT_ONLY = (
    "SFT takes neither preference nor unpaired-preference data (train it with --method dpo, orpo "
    "or kto)"
)
LAYOUTS = (*ALPACA, "chat")


def refuse_other_methods(record: dict[str, Any], reads: set[str], sft_hint: str = "") -> None:
    """Refuse data made for another training method than SFT, naming it: preference pairs
    (``chosen``/``rejected``: DPO, ORPO), unpaired preference (a boolean ``label``: KTO) and
    stepwise supervision (``completions`` + ``labels``: process reward models). ``reads``:
    the fields the formatter was told to read (mapping ``chosen`` on purpose is allowed);
    ``sft_hint`` says how to fine-tune on the chosen answers with this format."""
    keys = set(record) - reads
    if {"chosen", "rejected"} <= keys:
        raise InvalidInputError(
            "the record is preference data ('chosen' and 'rejected'), for DPO or ORPO (TRL's "
            f"DPOTrainer): {SFT_ONLY}"
            + (f"; to fine-tune on the chosen answers, {sft_hint}" if sft_hint else "")
        )
    label = record.get("label")
    if "label" in keys and isinstance(label, bool):
        raise InvalidInputError(
            f"the record's 'label' ({str(label).lower()}) marks unpaired preference data, for KTO "
            f"(TRL's KTOTrainer), whose undesirable answers SFT would learn: {SFT_ONLY}; to fine-tune "
            "on the desirable answers, keep the label-true records without the label"
        )
    if {"completions", "labels"} <= keys and isinstance(record.get("completions"), list):
        raise InvalidInputError(
            "the record is stepwise supervision ('completions' steps with 'labels'), which is for "
            "process reward models, not SFT: adaptr train takes one completion per record"
        )


def texts(record: dict[str, Any], *names: str) -> list[str]:
    """The text of each field (present, not empty, text: see :func:`adaptr.data.files.text_value`)."""
    return [text_value(v, name) for v, name in zip(need(record, *names), names, strict=True)]


def optional_text(record: dict[str, Any], name: str) -> str:
    """The text of an optional field; '' when absent or null."""
    value = record.get(name)
    return "" if value is None else text_value(value, name)


def text(record: dict[str, Any], field: str) -> dict[str, Any]:
    (value,) = need(record, field)
    hint = ""
    if (
        isinstance(value, list)
        and value
        and all(isinstance(m, dict) and "role" in m for m in value)
    ):
        hint = "a list of messages is a chat: use --format messages"
    return {"text": text_value(value, field, hint)}


def _history(record: dict[str, Any]) -> list[tuple[str, str]]:
    """LLaMA-Factory's ``history``: [[instruction, response], …] before the current turn."""
    value = record.get("history")
    if isinstance(value, str) and value.strip().startswith("["):  # a CSV/Parquet cell of JSON
        value = chat.json_value(value, "history")
    if value in (None, "", []):
        return []
    if not isinstance(value, list):
        raise MissingField("history", f"must be a list of [instruction, response] pairs, got {brief(value)}")  # fmt: skip
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise MissingField(f"history[{i}]", f"must be an [instruction, response] pair, got {brief(pair)}")  # fmt: skip
        q, a = (text_value(v, f"history[{i}][{k}]") for k, v in enumerate(pair))
        if not q.strip() or not a.strip():
            raise MissingField(f"history[{i}]", "holds an empty instruction or response")
        pairs.append((q, a))
    return pairs


def alpaca(record: dict[str, Any], lang: str) -> dict[str, Any]:
    if lang not in LAYOUTS:
        raise MissingField("lang", f"option must be one of {', '.join(LAYOUTS)}")
    # LLaMA-Factory's multimodal alpaca keeps images/videos/audios beside the text
    chat.refuse_media(record)
    refuse_other_methods(record, {"instruction", "input", "output"})
    output = record.get("output")
    if isinstance(output, list) and len(output) > 1:
        raise InvalidInputError(
            f"field 'output' is a list of {len(output)} answers: LLaMA-Factory's ranking layout "
            f"([chosen, rejected]) is preference data, for DPO or ORPO (TRL's DPOTrainer): {SFT_ONLY}; "
            "to fine-tune on the chosen answer, make it the 'output'"
        )
    instruction, output = texts(record, "instruction", "output")
    extra = optional_text(record, "input")
    system = optional_text(record, "system")
    history = _history(record)
    if lang == "chat":  # as LLaMA-Factory converts alpaca records: a conversation
        messages = [{"role": "system", "content": system}] if system.strip() else []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        user = "\n".join(t for t in (instruction, extra) if t.strip())
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return chat.conversation(messages, None, "output")
    if system.strip() or history:
        name = "history" if history else "system"
        what = (
            f"holds {len(history)} earlier turn{'s' * (len(history) != 1)}"
            if history
            else "holds a system prompt"
        )
        raise InvalidInputError(
            f"field {name!r} {what}, which the alpaca text layout (lang={lang}) has no place for: "
            "train the records as chats with --format-option lang=chat (the chat template renders "
            "every turn, every answer is learned), or remove the field"
        )
    with_input, without = ALPACA[lang]
    prompt = (with_input if extra.strip() else without).format(instruction=instruction, input=extra)
    return {"prompt": prompt, "completion": output}


def dolly(record: dict[str, Any], lang: str) -> dict[str, Any]:
    refuse_other_methods(record, {"instruction", "context", "response"})
    instruction, response = texts(record, "instruction", "response")
    context = optional_text(record, "context")
    fields = {"instruction": instruction, "input": context, "output": response}
    return alpaca({**{k: record[k] for k in chat.MEDIA_KEYS if k in record}, **fields}, lang)


def sharegpt(record: dict[str, Any], field: str, placeholders: str) -> dict[str, Any]:
    chat.refuse_media(record)
    refuse_other_methods(record, {field})
    (turns,) = need(record, field)
    if not isinstance(turns, list):
        raise MissingField(field, "must be a list of {from, value} turns")
    messages = []
    # LLaMA-Factory's sharegpt keeps the system prompt beside the turns
    system = optional_text(record, "system")
    if system.strip():
        messages.append(chat.message(record, "", "system", placeholders=placeholders, key="system"))
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise MissingField(where, "needs 'from' and 'value'")
        tag = turn.get("from", turn.get("role"))  # LLaMA-Factory also reads role/content tags
        key = "value" if "value" in turn else "content"
        value = turn.get(key)
        if tag is None or value is None:
            raise MissingField(where, "needs 'from' and 'value'")
        tag = str(tag).lower()
        # LLaMA-Factory / glaive: value = '{"name": …, "arguments": …}' (or a list of them)
        if tag == "function_call":
            calls = chat.tool_calls(value, f"{where}.value")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        role = SHAREGPT_ROLES.get(tag)
        if role is None:
            raise MissingField(
                f"{where}.from",
                f"is {brief(turn.get('from', turn.get('role')))}; use one of {', '.join(SHAREGPT_ROLES)}, function_call",
            )
        messages.append(chat.message(turn, where, role, placeholders=placeholders, key=key))
    return chat.conversation(messages, chat.tools_json(record.get("tools")), field)


def messages(record: dict[str, Any], field: str, placeholders: str) -> dict[str, Any]:
    chat.refuse_media(record)
    chosen = record.get("chosen")
    hint = ""
    if isinstance(chosen, list) and "prompt" in record:
        hint = "use --format prompt-completion --format-option completion_field=chosen"
    elif isinstance(chosen, list):  # TRL's implicit prompt: the whole conversation
        hint = "map them with --format-option field=chosen"
    refuse_other_methods(record, {field}, hint)
    if record.get(field) is None and "prompt" in record and "completion" in record:
        raise MissingField(field, "is missing", hint="the record has a prompt and a completion: use --format prompt-completion (text or lists of messages)")  # fmt: skip
    (turns,) = need(record, field)
    out = chat.message_list(turns, field, placeholders)
    tools = record.get("tools", record.get("functions"))  # functions: OpenAI's legacy name
    return chat.conversation(out, chat.tools_json(tools), field)


def prompt_completion(
    record: dict[str, Any], prompt_field: str, completion_field: str
) -> dict[str, Any]:
    """Text pairs (standard), or lists of messages (TRL's conversational prompt-completion:
    rendered with the chat template, the loss on the completion's tokens)."""
    chat.refuse_media(record)
    hint = "map them with --format-option completion_field=chosen"
    refuse_other_methods(record, {prompt_field, completion_field}, hint)
    if record.get(completion_field) is None and record.get(prompt_field) is not None:
        raise MissingField(
            completion_field, "is missing" if completion_field not in record else "is empty",
            hint="map another field with --format-option completion_field=NAME; a record with a prompt "
            "alone is prompt-only data, for online methods (TRL's GRPOTrainer, RLOOTrainer), not SFT",
        )  # fmt: skip
    prompt, completion = need(record, prompt_field, completion_field)
    lists = isinstance(prompt, list), isinstance(completion, list)
    if lists == (False, False):
        return {"prompt": text_value(prompt, prompt_field), "completion": text_value(completion, completion_field)}  # fmt: skip
    if lists != (True, True):
        listed, other = (
            (prompt_field, completion_field) if lists[0] else (completion_field, prompt_field)
        )
        raise MissingField(
            other,
            f"is not a list of messages while {listed!r} is one: give both as lists of messages "
            "(conversational prompt-completion) or both as text",
        )  # fmt: skip
    p = chat.message_list(prompt, prompt_field, "refuse")
    c = chat.message_list(completion, completion_field, "refuse")
    for i, m in enumerate(c):
        if m["role"] != "assistant":
            raise MissingField(
                f"{completion_field}[{i}]",
                f"is a {m['role']} message: the whole completion is learned, so it holds the "
                f"assistant's answer only; move the {m['role']} message into {prompt_field!r}",
            )
    out = chat.conversation(p + c, chat.tools_json(record.get("tools")), completion_field)
    both = out.pop("messages")  # tool results named after their calls
    return {"prompt": both[: len(p)], "completion": both[len(p) :], **out}


def translation(record: dict[str, Any], direction: str | None, template: str) -> dict[str, Any]:
    if direction:
        src, _, tgt = direction.partition("-")
        if not tgt:
            raise MissingField("direction", "option must look like 'zh-en' (source-target)")
    else:
        src, tgt = "source", "target"
    refuse_other_methods(record, {src, tgt})
    source, target = texts(record, src, tgt)
    names = {"src": LANGUAGES.get(src, src), "tgt": LANGUAGES.get(tgt, tgt)}
    if not direction:
        names = {
            "src": optional_text(record, "source_lang") or "the source language",
            "tgt": optional_text(record, "target_lang") or "the target language",
        }
    return {"prompt": template.format(source=source, **names), "completion": target}


def sharegpt_preference(
    record: dict[str, Any], field: str, placeholders: str, chosen_field: str, rejected_field: str
) -> dict[str, Any]:
    """LLaMA-Factory's ShareGPT dpo layout: ``conversations`` (the prompt turns, + system,
    tools) and ``chosen`` / ``rejected`` turns ({from: gpt, value}, or a list of them)."""
    chosen, rejected = need(record, chosen_field, rejected_field)
    rest = {k: v for k, v in record.items() if k not in (chosen_field, rejected_field)}
    prompt = record.get(field) or []
    if not isinstance(prompt, list):
        raise MissingField(field, "must be a list of {from, value} turns")

    def half(answer: Any) -> dict[str, Any]:
        answer = answer if isinstance(answer, list) else [answer]
        return sharegpt({**rest, field: [*prompt, *answer]}, field, placeholders)

    return preference.pair_of(half(chosen), half(rejected))


def alpaca_preference(record: dict[str, Any], lang: str) -> dict[str, Any]:
    """LLaMA-Factory's alpaca dpo layout: instruction/input (+ system, history) and text
    ``chosen`` / ``rejected`` answers, or its ranking ``output: [chosen, rejected]``; lang as
    the alpaca format's (chat: the chat template)."""
    output = record.get("output")
    if "chosen" not in record and isinstance(output, list) and len(output) == 2:
        record = {**record, "chosen": output[0], "rejected": output[1]}  # the ranking layout
    chosen, rejected = texts(record, "chosen", "rejected")
    rest = {k: v for k, v in record.items() if k not in ("chosen", "rejected", "output")}
    return preference.pair_of(
        alpaca({**rest, "output": chosen}, lang), alpaca({**rest, "output": rejected}, lang)
    )


@hookimpl
def adaptr_register_formatters(register):
    for f in PREFERENCE_FORMATTERS:
        register(f)
    register(
        Formatter(
            "text",
            text,
            kind="text",
            fields=["text"],
            options={"field": "text"},
            description="Plain language modelling on one text field (option field=…).",
        )
    )
    register(
        Formatter(
            "alpaca",
            alpaca,
            fields=["instruction", "output"],
            options={"lang": "zh"},
            description="instruction/input/output; lang=zh is the Chinese ### 指令/### 输入/### 回答 layout, "
            "lang=en Stanford Alpaca's, lang=chat a chat for the base's template (LLaMA-Factory's "
            "system and history as turns; every answer learned).",
        )
    )
    register(
        Formatter(
            "dolly",
            dolly,
            fields=["instruction", "response"],
            options={"lang": "en"},
            description="Databricks Dolly: instruction/context/response in the alpaca layout.",
        )
    )
    register(
        Formatter(
            "sharegpt",
            sharegpt,
            kind="messages",
            fields=["conversations"],
            options={"field": "conversations", "placeholders": "refuse"},
            description="ShareGPT conversations [{from: human|gpt|system|function_call|observation, value}] "
            "(+ system, tools) -> chat messages; tool calls kept for the chat template.",
        )
    )
    register(
        Formatter(
            "messages",
            messages,
            kind="messages",
            fields=["messages"],
            options={"field": "messages", "placeholders": "refuse"},
            description="OpenAI-style messages [{role, content}] (text parts, tool_calls, tool results, "
            "tools), kept as structure for the chat template.",
        )
    )
    register(
        Formatter(
            "prompt-completion",
            prompt_completion,
            fields=["prompt", "completion"],
            options={"prompt_field": "prompt", "completion_field": "completion"},
            description="Ready prompt/completion pairs, as text or as lists of messages (TRL's "
            "conversational prompt-completion, rendered with the chat template); loss on the completion only.",
        )
    )
    register(
        Formatter(
            "translation",
            translation,
            fields=["source", "target"],
            options={"direction": None, "template": "Translate from {src} to {tgt}:\n{source}\n"},
            description="Translation pairs; direction=zh-en reads fields zh and en, else source/target.",
        )
    )


PREFERENCE_FORMATTERS = [
    Formatter(
        "preference", preference.preference, kind="preference", fields=["chosen", "rejected"],
        options={"prompt_field": "prompt", "chosen_field": "chosen", "rejected_field": "rejected"},
        description="TRL preference pairs for DPO/ORPO: prompt/chosen/rejected as text or lists of "
        "messages, the prompt explicit or implicit (shared opening turns); UltraFeedback's records "
        "(score_chosen below score_rejected is refused).",
    ),
    Formatter(
        "sharegpt-preference", sharegpt_preference, kind="preference",
        fields=["conversations", "chosen", "rejected"],
        options={"field": "conversations", "placeholders": "refuse", "chosen_field": "chosen",
                 "rejected_field": "rejected"},
        description="LLaMA-Factory's ShareGPT dpo data: conversations (+ system, tools) and the "
        "chosen / rejected {from: gpt, value} turns.",
    ),
    Formatter(
        "alpaca-preference", alpaca_preference, kind="preference",
        fields=["instruction", "chosen", "rejected"], options={"lang": "chat"},
        description="LLaMA-Factory's alpaca dpo data: instruction/input (+ system, history) with "
        "chosen / rejected answers (or output: [chosen, rejected]); lang=chat (the chat template), en or zh (alpaca text layouts).",
    ),
    Formatter(
        "kto", preference.unpaired, kind="unpaired-preference",
        fields=["prompt", "completion", "label"],
        options={"prompt_field": "prompt", "completion_field": "completion", "label_field": "label",
                 "messages_field": "messages"},
        description="KTO's unpaired preference data: prompt/completion (text or lists of messages), "
        "or LLaMA-Factory's messages ending in the answer, and a true (desirable) / false "
        "(undesirable) label (label_field=kto_tag for its sharegpt files).",
    ),
]  # fmt: skip
