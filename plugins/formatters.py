"""Built-in dataset formatters: text, alpaca, dolly, sharegpt, messages, prompt-completion, translation."""

from __future__ import annotations

from typing import Any

from adaptr import Formatter, hookimpl
from adaptr.formatters import MissingField, need

ALPACA = {
    # the seeds' layout
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
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}  # fmt: skip


def text(record: dict[str, Any], field: str) -> dict[str, Any]:
    (value,) = need(record, field)
    return {"text": str(value)}


def alpaca(record: dict[str, Any], lang: str) -> dict[str, Any]:
    if lang not in ALPACA:
        raise MissingField("lang", f"option must be one of {', '.join(ALPACA)}")
    instruction, output = need(record, "instruction", "output")
    extra = record.get("input") or ""
    with_input, without = ALPACA[lang]
    prompt = (with_input if str(extra).strip() else without).format(
        instruction=instruction, input=extra
    )
    return {"prompt": prompt, "completion": str(output)}


def dolly(record: dict[str, Any], lang: str) -> dict[str, Any]:
    instruction, response = need(record, "instruction", "response")
    return alpaca(
        {"instruction": instruction, "input": record.get("context") or "", "output": response}, lang
    )


def sharegpt(record: dict[str, Any], field: str) -> dict[str, Any]:
    (turns,) = need(record, field)
    if not isinstance(turns, list):
        raise MissingField(field, "must be a list of {from, value} turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise MissingField(f"{field}[{i}]", "needs 'from' and 'value'")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise MissingField(
                f"{field}[{i}].from", f"is {turn['from']!r}; use one of {', '.join(SHAREGPT_ROLES)}"
            )
        messages.append({"role": role, "content": str(turn["value"])})
    return _check_chat(messages, field)


def messages(record: dict[str, Any], field: str) -> dict[str, Any]:
    (turns,) = need(record, field)
    if not isinstance(turns, list):
        raise MissingField(field, "must be a list of {role, content} messages")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MissingField(f"{field}[{i}]", "needs 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise MissingField(
                f"{field}[{i}].role", f"is {m['role']!r}; use system, user, assistant or tool"
            )
        out.append({"role": m["role"], "content": str(m["content"])})
    return _check_chat(out, field)


def _check_chat(msgs: list[dict[str, str]], field: str) -> dict[str, Any]:
    if not any(m["role"] == "assistant" for m in msgs):
        raise MissingField(field, "has no assistant turn to learn from")
    return {"messages": msgs}


def prompt_completion(
    record: dict[str, Any], prompt_field: str, completion_field: str
) -> dict[str, Any]:
    prompt, completion = need(record, prompt_field, completion_field)
    return {"prompt": str(prompt), "completion": str(completion)}


def translation(record: dict[str, Any], direction: str | None, template: str) -> dict[str, Any]:
    if direction:
        src, _, tgt = direction.partition("-")
        if not tgt:
            raise MissingField("direction", "option must look like 'zh-en' (source-target)")
    else:
        src, tgt = "source", "target"
    source, target = need(record, src, tgt)
    names = {"src": LANGUAGES.get(src, src), "tgt": LANGUAGES.get(tgt, tgt)}
    if not direction:
        names = {
            "src": record.get("source_lang", "the source language"),
            "tgt": record.get("target_lang", "the target language"),
        }
    return {"prompt": template.format(source=source, **names), "completion": str(target)}


@hookimpl
def adaptr_register_formatters(register):
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
            description="instruction/input/output; lang=zh is the seeds' ### 指令/### 输入/### 回答 layout, lang=en Stanford Alpaca's.",
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
            options={"field": "conversations"},
            description="ShareGPT conversations [{from: human|gpt|system, value}] -> chat messages.",
        )
    )
    register(
        Formatter(
            "messages",
            messages,
            kind="messages",
            fields=["messages"],
            options={"field": "messages"},
            description="OpenAI-style messages [{role, content}], kept as structure for the chat template.",
        )
    )
    register(
        Formatter(
            "prompt-completion",
            prompt_completion,
            fields=["prompt", "completion"],
            options={"prompt_field": "prompt", "completion_field": "completion"},
            description="Ready prompt/completion pairs (loss on the completion only).",
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
