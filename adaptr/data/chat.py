"""Chat records: real-world message shapes in, TRL's ``{"messages", "tools"}`` out, and a
check that a chat template renders all of it.

What the chat formatters accept (``messages`` and ``sharegpt`` use this module):

* content as a string or a list of parts; text parts are joined with a newline (OpenAI's
  ``{"type": "text", "text": …}``, LLaMA-Factory v1's ``{"type": "text", "value": …}``, the
  Responses API's ``input_text``/``output_text``, an assistant's ``refusal``), the way
  ``adaptr serve`` joins them, so training and serving see the same text;
* tool calls: OpenAI ``tool_calls`` (``arguments`` a JSON string or an object), the legacy
  ``function_call``, LLaMA-Factory v1 ``tool_call`` parts; ``tool`` (legacy ``function``)
  results with ``tool_call_id``/``name``; a record-level ``tools`` (legacy ``functions``)
  list, as a list or a JSON string, each tool OpenAI-shaped or a bare function schema;
* images, audio and video are refused (parts, record keys, ``<image>``-style placeholders):
  adaptr trains text models, and dropping the media would teach the text without them;
* per-turn loss switches (OpenAI's ``weight`` 0/1, LLaMA-Factory v1's ``loss_weight``,
  axolotl's ``train`` and ``train_detail``): every assistant turn is learned and nothing else,
  so a switch that agrees passes and one that asks otherwise (or is no 0/1, true/false value:
  ``"0"``, ``false`` or ``0.5`` as a weight) is refused naming the message;
* a speaker's ``name`` (OpenAI's) is kept on the message, and :func:`check_template`
  refuses a template that does not render it; content is text (a whole number is its digits;
  a float only as a tool's JSON result).

The TRL record is ``{"messages": [...], "tools": "<JSON list>"}``: tool calls as
``{"type": "function", "function": {"name", "arguments": {…}}}`` with ``arguments`` an object
(what transformers' chat templates expect: Qwen2.5's and Llama 3.1's ``| tojson`` would quote
a string a second time) and ``tools`` a JSON string, which TRL's SFTTrainer decodes before
``apply_chat_template(messages, tools=…)``. Tool arguments of different shapes in one dataset
only survive ``datasets.Dataset.from_list`` with ``on_mixed_types="use_json"`` (without it
Arrow merges the objects' keys and fills the missing ones with null).

:func:`check_template` renders a record and refuses a template that drops any part of it
(the tools, a tool call, its arguments, a message, a speaker's name) or, with assistant-only loss, whose
``{% generation %}`` markers leave assistant text or tool calls out of the loss.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any

from adaptr.errors import InvalidInputError, brief, first_line
from adaptr.extend.types import MissingField, MultimodalData

ROLES = ("system", "user", "assistant", "tool")
ROLE_ALIASES = {"developer": "system", "function": "tool"}  # OpenAI's newer and legacy names
TEXT_PARTS = {"text", "input_text", "output_text"}
MEDIA_PARTS = {
    "image": "image", "image_url": "image", "input_image": "image",
    "audio": "audio", "audio_url": "audio", "input_audio": "audio",
    "video": "video", "video_url": "video",
    "file": "file", "input_file": "file",
}  # fmt: skip
MEDIA_WORDS = ("image", "audio", "video")  # image_file, video_frames… are media too
MEDIA_KEYS = {"images": "image", "image": "image", "videos": "video", "video": "video",
              "audios": "audio", "audio": "audio"}  # fmt: skip
PLACEHOLDER = re.compile(r"<(image|video|audio)>")
PLACEHOLDERS = ("refuse", "keep")
UNSUPPORTED = "multimodal training is not supported (adaptr trains text-only models)"


# ---------------------------------------------------------------- building messages


def refuse_media(record: dict[str, Any]) -> None:
    """Raise MultimodalData if the record carries images, audio or video in its own keys
    (LLaMA-Factory's ``images``/``videos``/``audios``, LLaVA's ``image``)."""
    for key, kind in MEDIA_KEYS.items():
        value = record.get(key)
        if value not in (None, "", [], {}):
            n = len(value) if isinstance(value, list) else 1
            raise MultimodalData(
                f"{UNSUPPORTED}: the record's {key!r} field holds {n} {kind}{'s' * (n != 1)}; "
                "train on text-only records"
            )


def refuse_placeholders(text: str, where: str) -> None:
    found = PLACEHOLDER.search(text)
    if found:
        raise MultimodalData(
            f"{UNSUPPORTED}: {where} holds the placeholder {found.group(0)}; train on text-only "
            "records, or set --format-option placeholders=keep if it is meant as text"
        )


def content_text(content: Any, where: str, role: str) -> tuple[str, list[dict[str, Any]]]:
    """A message's text, and the tool calls among its parts (LLaMA-Factory v1 ``tool_call``)."""
    if isinstance(content, str):
        return content, []
    if content is None:
        return "", []
    if isinstance(content, bool) or not isinstance(content, (list, int, float, dict)):
        raise MissingField(where, f"must be text or a list of parts, got {brief(content)}")
    if isinstance(content, int):
        return str(content), []
    if isinstance(content, float):
        if role == "tool" and math.isfinite(content):  # a tool's JSON result
            return json.dumps(content), []
        raise MissingField(
            where,
            f"is the number {content!r}, not text (a float keeps no written form: 1.5 or 1.50?): "
            "write it as a string",
        )
    if isinstance(content, dict):
        if role == "tool":  # a tool's JSON result
            return json.dumps(content, ensure_ascii=False), []
        content = [content]  # one part on its own
    texts, calls = [], []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise MissingField(at, f"must be a part with a 'type', got {brief(part)}")
        kind = part["type"]
        media = MEDIA_PARTS.get(kind) or next((w for w in MEDIA_WORDS if w in kind), None)
        if media:
            raise MultimodalData(
                f"{UNSUPPORTED}: {at} is {_a(media)} part (type {brief(kind)}); train on text-only records"
            )
        if kind in TEXT_PARTS or kind == "refusal":
            value = next((part[k] for k in ("text", "value", "refusal") if k in part), None)
            if not isinstance(value, str):
                raise MissingField(at, f"is a {kind!r} part without a 'text' (or 'value') string")
            texts.append(value)
        elif kind == "tool_call":  # LLaMA-Factory v1: value = '{"name": …, "arguments": …}'
            calls.append(json_value(part.get("value", part.get("tool_call")), f"{at}.value"))
        elif kind in ("reasoning", "thinking"):
            raise MissingField(
                at,
                f"is a {kind!r} part, which adaptr does not train yet; remove the reasoning parts "
                "or fold them into the text (e.g. as <think>…</think>)",
            )
        else:
            raise MissingField(
                at,
                f"is a {brief(kind)} part; only text parts (type 'text') and tool calls can be trained",
            )
    return "\n".join(texts), calls


def tool_call(call: Any, where: str) -> dict[str, Any]:
    """One tool call as transformers' templates take it: ``{"type": "function", "function":
    {"name", "arguments": {…}}}`` (plus ``id`` if it has one)."""
    if not isinstance(call, dict):
        raise MissingField(where, f"must be an object with a function name, got {brief(call)}")
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        raise MissingField(
            f"{where}.name", "is missing" if name is None else f"must be a name, got {brief(name)}"
        )
    args = fn.get("arguments", fn.get("parameters"))
    if isinstance(args, str):
        args = json_value(args, f"{where}.arguments") if args.strip() else {}
    elif args is None:
        args = {}
    if not isinstance(args, dict):
        raise MissingField(
            f"{where}.arguments",
            f"must be a JSON object (or a string holding one), got {brief(args)}",
        )
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": args}}
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """A list of tool calls from a list, one call, or a JSON string holding either."""
    if isinstance(value, str):
        value = json_value(value, where)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise MissingField(where, f"must be a list of tool calls, got {brief(value)}")
    return [tool_call(c, f"{where}[{k}]") for k, c in enumerate(value)]


def tools_json(value: Any, where: str = "tools") -> str | None:
    """A record's tool list as TRL takes it: a JSON string of OpenAI-shaped tools, or None."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        value = json_value(value, where)
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise MissingField(where, f"must be a list of tools, got {brief(value)}")
    out = []
    for k, tool in enumerate(value):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) and isinstance(tool, dict):
            # a bare function schema (LLaMA-Factory, glaive) or a flat one (the Responses API)
            fn = {key: v for key, v in tool.items() if key != "type"}
        if (
            not isinstance(fn, dict)
            or not isinstance(fn.get("name"), str)
            or not fn["name"].strip()
        ):
            raise MissingField(
                f"{where}[{k}]", f"must be a function schema with a 'name', got {brief(tool)}"
            )
        out.append({"type": "function", "function": fn})
    return json.dumps(out, ensure_ascii=False) if out else None


def message_list(value: Any, field: str, placeholders: str = "refuse") -> list[dict[str, Any]]:
    """OpenAI-style ``[{role, content}, …]`` normalised through :func:`message` (roles by
    their aliases), or a :class:`MissingField` naming what is wrong where."""
    if not isinstance(value, list):
        raise MissingField(field, "must be a list of {role, content} messages")
    if not value:
        raise MissingField(field, "is an empty list")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise MissingField(f"{field}[{i}]", "needs 'role' and 'content'")
        role = ROLE_ALIASES.get(m["role"], m["role"]) if isinstance(m["role"], str) else None
        if role not in ROLES:
            raise MissingField(
                f"{field}[{i}].role", f"is {brief(m['role'])}; use system, user, assistant or tool"
            )
        out.append(message(m, f"{field}[{i}]", role, placeholders=placeholders))
    return out


def message(
    m: dict[str, Any], where: str, role: str, *, placeholders: str = "refuse", key: str = "content"
) -> dict[str, Any]:
    """One normalised message from ``m`` (its text in ``m[key]``): ``role``, text ``content``,
    and ``tool_calls`` / ``tool_call_id`` / ``name`` where they apply. ``placeholders``:
    'refuse' (``<image>``-style placeholders are refused) or 'keep' (they are text)."""
    if placeholders not in PLACEHOLDERS:
        raise MissingField("placeholders", f"option must be {' or '.join(PLACEHOLDERS)}")
    at = f"{where}.{key}" if where else key
    text, parts = content_text(m.get(key), at, role)
    calls = [tool_call(c, f"{where}.content") for c in parts]
    if m.get("tool_calls") not in (None, []):
        calls = tool_calls(m["tool_calls"], f"{where}.tool_calls") + calls
    elif m.get("function_call") is not None:  # OpenAI's legacy single call
        calls = [tool_call(m["function_call"], f"{where}.function_call")] + calls
    if calls and role != "assistant":
        raise MissingField(
            where, f"is a {role} message with tool calls; only assistant messages make them"
        )
    if m.get(key) is None and not calls:
        raise MissingField(where, f"needs 'role' and 'content' (a {role} message without content)")
    if placeholders == "refuse":
        refuse_placeholders(text, at)
    _check_loss_switches(m, where, role)
    out: dict[str, Any] = {"role": role, "content": text}
    if calls:
        out["tool_calls"] = calls
    if role == "tool":
        for k in ("tool_call_id", "name"):
            if isinstance(m.get(k), str) and m[k]:
                out[k] = m[k]
    elif m.get("name") is not None:  # who speaks (OpenAI): kept; check_template refuses a
        name = m["name"]  # template that does not render it
        if not isinstance(name, str) or not name.strip():
            raise MissingField(f"{where}.name", f"must be a speaker's name, got {brief(name)}")
        out["name"] = name
    return out


# per-turn loss switches: OpenAI fine-tuning's weight (0 or 1), LLaMA-Factory v1's loss_weight
# (0.0 or 1.0), axolotl's train (true or false) and its train_detail character spans
WEIGHTS = {"weight": "OpenAI's", "loss_weight": "LLaMA-Factory's"}


def _check_loss_switches(m: dict[str, Any], where: str, role: str) -> None:
    """Every assistant turn is learned and nothing else is: a switch that says otherwise is
    refused (naming the message), and a value that is not a switch is refused too (OpenAI's
    weight is 0 or 1; a string "0", false or 0.5 is not one)."""
    learn = role == "assistant"
    for key, whose in WEIGHTS.items():
        w = m.get(key)
        if w is None:
            continue
        whole = isinstance(w, int) or (key == "loss_weight" and isinstance(w, float))
        if isinstance(w, bool) or not whole or w not in (0, 1):
            raise MissingField(
                f"{where}.{key}",
                f"must be 0 or 1 ({whose} values: learn the turn or not), got {brief(w)}",
            )
        if learn and w == 0:
            raise MissingField(
                f"{where}.{key}",
                "is 0 (do not learn this turn), which adaptr cannot honour: every assistant turn is "
                "learned; drop the turn or the weight",
            )
        if not learn and w == 1:
            raise MissingField(
                f"{where}.{key}", f"is 1 on a {role} message: adaptr learns assistant turns only; set it to 0 or drop it"
            )  # fmt: skip
    train = m.get("train")
    if train is not None:
        if not isinstance(train, bool):
            raise MissingField(f"{where}.train", f"must be true or false (axolotl's per-turn switch), got {brief(train)}")  # fmt: skip
        if learn and not train:
            raise MissingField(
                f"{where}.train",
                "is false (do not learn this turn), which adaptr cannot honour: every assistant turn "
                "is learned; drop the turn or the field",
            )
        if not learn and train:
            raise MissingField(f"{where}.train", f"is true on a {role} message: adaptr learns assistant turns only; set it to false or drop it")  # fmt: skip
    if m.get("train_detail") not in (None, []):
        raise MissingField(
            f"{where}.train_detail",
            "(axolotl's per-character loss spans) cannot be honoured: adaptr learns whole assistant "
            "turns; remove the field",
        )


def conversation(messages: list[dict[str, Any]], tools: str | None, field: str) -> dict[str, Any]:
    """The TRL record: checks there is something to learn and names each tool result after its
    call (templates that show the name need it; OpenAI's results carry only the call id)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise MissingField(field, "has no assistant turn to learn from")
    name_tool_results(messages)
    return {"messages": messages, "tools": tools} if tools else {"messages": messages}


def name_tool_results(messages: list[dict[str, Any]]) -> None:
    """Give each ``tool`` message without a ``name`` its call's (by ``tool_call_id``, else the
    next unanswered call of the last assistant turn), in place; ``adaptr serve`` renders
    conversations the same way."""
    by_id: dict[str, str] = {}
    pending: list[str] = []  # names of the last assistant turn's calls, in order
    for m in messages:
        if m["role"] == "assistant":
            calls = [c["function"]["name"] for c in m.get("tool_calls", [])]
            by_id.update(
                {c["id"]: c["function"]["name"] for c in m.get("tool_calls", []) if "id" in c}
            )
            pending = calls
        elif m["role"] == "tool":
            name = by_id.get(m.get("tool_call_id", "")) or (pending[0] if pending else None)
            if name and "name" not in m:
                m["name"] = name
            if pending:
                pending = pending[1:]
        else:
            pending = []


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def json_value(text: Any, where: str) -> Any:
    """``text`` parsed as JSON (a non-string is returned as it is); raises MissingField."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        raise MissingField(where, f"is not valid JSON: {brief(text)}") from None


# ---------------------------------------------------------------- checking a template

PROBE = "adaptr-probe-7f3a"
_MARKERS = re.compile(r"\{%-?\s*generation\s*-?%\}")


def has_generation_markers(template: Any) -> bool:
    """Whether a chat template (a string, or named variants) has ``{% generation %}`` blocks."""
    if isinstance(template, dict):
        template = template.get("default", "")
    return isinstance(template, str) and _MARKERS.search(template) is not None


def training_template(tokenizer, assistant_only_loss: bool = True) -> str | None:
    """The template training renders with: None for the tokenizer's own, or TRL's training
    version of it (with generation markers) when assistant-only loss needs markers the
    tokenizer's lacks and TRL knows the template. None too when TRL cannot patch it: adaptr's
    trainer then finds assistant turns by rendering turn by turn (``sft_data``). Raises
    InvalidInputError when the tokenizer has no template at all."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidInputError(
            "the tokenizer has no chat template to render messages with; use a chat model's "
            "tokenizer, a base whose family brings a template, or a prompt-completion format"
        )
    if not assistant_only_loss or has_generation_markers(template):
        return None
    from trl.chat_template_utils import get_training_chat_template

    try:
        return get_training_chat_template(tokenizer)
    except (ValueError, NotImplementedError):
        return None


def render(tokenizer, record: dict[str, Any], *, chat_template: str | None = None, **kwargs: Any):
    """``apply_chat_template`` on a TRL record the way SFTTrainer calls it (``tools`` decoded
    from JSON); text unless ``tokenize=True`` is passed."""
    tools = record.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs.setdefault("tokenize", False)
    return tokenizer.apply_chat_template(
        record["messages"], tools=tools or None, chat_template=chat_template, **kwargs
    )


def check_template(tokenizer, record: dict[str, Any], *, assistant_only_loss: bool = True) -> None:
    """Refuse (InvalidInputError, one line) a chat template that cannot train on ``record``.

    ``record`` is a TRL chat record (``messages``, optional ``tools``) from a formatter. The
    template is the one SFTTrainer will use (see :func:`training_template`). Refused: no
    template; a rendering error; a template that ignores the ``tools``, a message's content,
    a tool call or its arguments (each is changed in turn and the rendering must change); with
    ``assistant_only_loss`` and generation markers (the template's own or TRL's patched
    version), markers whose loss mask leaves out an assistant turn's text or tool calls, or
    covers a user/system/tool message. A template without markers that TRL cannot patch is not
    refused for that: the trainer finds assistant turns by rendering, which takes whatever the
    template renders for a turn (checked above).
    """
    template = training_template(tokenizer, assistant_only_loss)

    def text(rec: dict[str, Any]) -> str:
        try:
            return render(tokenizer, rec, chat_template=template)
        except Exception as e:  # jinja2 TemplateError, or TypeError/ValueError from a filter
            raise InvalidInputError(
                f"the chat template cannot render this conversation ({type(e).__name__}: {first_line(e)})"
            ) from None

    full = text(record)
    msgs = record["messages"]

    def changed(i: int, **fields: Any) -> bool:
        altered = [dict(m, **fields) if k == i else m for k, m in enumerate(msgs)]
        return text({**record, "messages": altered}) != full

    if record.get("tools") and text({"messages": msgs}) == full:
        raise InvalidInputError(
            "the chat template ignores the 'tools' list (it renders the same without it), so the "
            "model would learn tool calls without seeing the tools; use a tokenizer whose template "
            "renders tools (e.g. Qwen2.5's), or give one with --set sft.chat_template_path=FILE.jinja"
        )
    for i, m in enumerate(msgs):
        what = f"message {i + 1} ({m['role']})"
        if m.get("content") and not changed(i, content=PROBE):
            raise InvalidInputError(f"the chat template drops the content of {what}; use a template that renders every {m['role']} message")  # fmt: skip
        if m["role"] != "tool" and m.get("name") and not changed(i, name=PROBE):
            raise InvalidInputError(
                f"the chat template ignores the name {brief(m['name'])} of {what}, so the model "
                "would not see who speaks: remove the names (or write them into the content), or "
                "use a template that renders 'name' (sft.chat_template_path=FILE.jinja)"
            )
        calls = m.get("tool_calls") or []
        if calls and not changed(i, tool_calls=None):
            raise InvalidInputError(f"the chat template drops the tool calls of {what}; use a template that renders tool_calls (e.g. Qwen2.5's), or give one with --set sft.chat_template_path=FILE.jinja")  # fmt: skip
        if calls:
            probe = [
                {**c, "function": {**c["function"], "arguments": {PROBE: PROBE}}} for c in calls
            ]
            if not changed(i, tool_calls=probe):
                raise InvalidInputError(f"the chat template drops the arguments of the tool calls of {what}")  # fmt: skip
    if assistant_only_loss and has_generation_markers(template or tokenizer.chat_template):
        _check_mask(tokenizer, record, template)


def _check_mask(tokenizer, record: dict[str, Any], template: str | None) -> None:
    enc = render(tokenizer, record, chat_template=template, tokenize=True, return_dict=True,
                 return_assistant_tokens_mask=True)  # fmt: skip
    ids, mask = list(enc["input_ids"]), list(enc["assistant_masks"])
    if ids and isinstance(ids[0], list):  # a batch of one
        ids, mask = ids[0], mask[0]
    picked = _squash(
        tokenizer.decode(
            [t for t, m in zip(ids, mask, strict=True) if m], clean_up_tokenization_spaces=False
        )
    )
    if not picked.strip():
        raise InvalidInputError(
            "the chat template's {% generation %} markers cover no assistant text, so nothing "
            "would be trained; fix the template or set sft.assistant_only_loss: false"
        )
    said = []
    for i, m in enumerate(record["messages"]):
        if m["role"] != "assistant":
            continue
        what = f"message {i + 1} (assistant)"
        if _squash(m.get("content")) not in picked:
            raise InvalidInputError(f"the chat template's {{% generation %}} markers leave the text of {what} out of the loss")  # fmt: skip
        for c in m.get("tool_calls") or []:
            if c["function"]["name"] not in picked:
                raise InvalidInputError(f"the chat template's {{% generation %}} markers leave the tool calls of {what} out of the loss, so they would not be trained")  # fmt: skip
        said.append(_squash(m.get("content")))
        said += [
            _squash(json.dumps(c["function"], ensure_ascii=False))
            for c in m.get("tool_calls") or []
        ]
    for i, m in enumerate(record["messages"]):
        own = _squash(m.get("content"))
        if (
            m["role"] != "assistant"
            and len(own) >= 8
            and own in picked
            and not any(own in s for s in said)
        ):
            raise InvalidInputError(f"the chat template's {{% generation %}} markers put message {i + 1} ({m['role']}) into the loss; only assistant turns should be")  # fmt: skip


def _squash(text: str | None) -> str:
    """``text`` with runs of whitespace as one space (decoding may not keep them exactly)."""
    return " ".join((text or "").split())


def check_templates(
    tokenizer,
    records: Iterable[dict[str, Any]],
    *,
    assistant_only_loss: bool = True,
    limit: int = 8,
) -> None:
    """:func:`check_template` on a few records that between them show every kind of turn the
    data holds (tools, tool calls, tool results, system messages…); errors start
    ``record N:`` (1-based, in formatted order)."""
    seen: set[frozenset[str]] = set()
    for n, rec in enumerate(records, 1):
        if "messages" not in rec:
            return
        shape = frozenset(
            {m["role"] for m in rec["messages"]}
            | ({"tools"} if rec.get("tools") else set())
            | ({"tool_calls"} if any(m.get("tool_calls") for m in rec["messages"]) else set())
            | {
                f"name:{m['role']}"
                for m in rec["messages"]
                if m.get("name") and m["role"] != "tool"
            }
        )
        if shape in seen or any(shape <= s for s in seen):
            continue
        seen.add(shape)
        try:
            check_template(tokenizer, rec, assistant_only_loss=assistant_only_loss)
        except InvalidInputError as e:
            raise InvalidInputError(f"record {n}: {e}") from None
        if len(seen) >= limit:
            return
