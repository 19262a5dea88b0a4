"""Built-in dataset formatters: text, alpaca, dolly, sharegpt, messages, prompt-completion, translation.

The chat formats (sharegpt, messages) read content parts, tool calls, tool results and tool
lists through :mod:`adaptr.chat`, and refuse images, audio and video.
"""

from __future__ import annotations

from typing import Any

from adaptr import Formatter, chat, hookimpl
from adaptr.errors import brief
from adaptr.formatters import MissingField, need

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


def text(record: dict[str, Any], field: str) -> dict[str, Any]:
    (value,) = need(record, field)
    return {"text": str(value)}


def alpaca(record: dict[str, Any], lang: str) -> dict[str, Any]:
    if lang not in ALPACA:
        raise MissingField("lang", f"option must be one of {', '.join(ALPACA)}")
    # LLaMA-Factory's multimodal alpaca keeps images/videos/audios beside the text
    chat.refuse_media(record)
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


def sharegpt(record: dict[str, Any], field: str, placeholders: str) -> dict[str, Any]:
    chat.refuse_media(record)
    (turns,) = need(record, field)
    if not isinstance(turns, list):
        raise MissingField(field, "must be a list of {from, value} turns")
    messages = []
    # LLaMA-Factory's sharegpt keeps the system prompt beside the turns
    system = record.get("system")
    if isinstance(system, str) and system.strip():
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
    (turns,) = need(record, field)
    if not isinstance(turns, list):
        raise MissingField(field, "must be a list of {role, content} messages")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or "role" not in m:
            raise MissingField(f"{field}[{i}]", "needs 'role' and 'content'")
        role = chat.ROLE_ALIASES.get(m["role"], m["role"]) if isinstance(m["role"], str) else None
        if role not in chat.ROLES:
            raise MissingField(
                f"{field}[{i}].role", f"is {brief(m['role'])}; use system, user, assistant or tool"
            )
        out.append(chat.message(m, f"{field}[{i}]", role, placeholders=placeholders))
    tools = record.get("tools", record.get("functions"))  # functions: OpenAI's legacy name
    return chat.conversation(out, chat.tools_json(tools), field)


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
            description="instruction/input/output; lang=zh is the Chinese ### 指令/### 输入/### 回答 layout, lang=en Stanford Alpaca's.",
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
