"""Tool calls on chat completions: ``tools`` and ``tool_choice`` checked, the tools rendered
by the chat template the adapter trained with, and the model's answer parsed back into
OpenAI ``tool_calls``.

Rendering is training's: the tools go to ``apply_chat_template(messages, tools=…)`` as
OpenAI function tools (TRL's record), a conversation's assistant ``tool_calls`` are
normalised by :func:`adaptr.data.chat.tool_calls` (``arguments`` as objects) and ``tool``
results are named after their call (:func:`adaptr.data.chat.name_tool_results`). A template
that renders the same with and without the tools is refused (400): the model would never
see them.

Parsing: each tool-call format is a :class:`ToolFormat` in :data:`FORMATS` (a plugin may
add one with :func:`register_format`): ``hermes`` (Qwen2/2.5/3, Hermes, and the built-in
ChatML and plain templates: ``<tool_call>{"name": …, "arguments": …}</tool_call>``, several
in one answer, an unterminated last one taken when its JSON is whole, as vLLM),
``llama3_json`` (LLaMA 3.x: the answer is ``{"name": …, "parameters": …}``, optionally after
``<|python_tag|>``, several separated by ``;``) and ``mistral`` (``[TOOL_CALLS] [{"name": …,
"arguments": …}, …]``, the built-in llama family's template; the array alone when the
tokenizer dropped ``[TOOL_CALLS]`` as a special token) and ``deepseek_v3`` (DeepSeek-V3's
own template: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` and
the arguments in a fenced JSON block; the built-in deepseek family's template writes hermes
calls). The format is the family's
``tool_format`` when the template is that family's own, else the one whose signs the
template shows (:func:`format_for`).

What is returned: a call is valid when its JSON is whole, names a function of the request's
``tools`` and its arguments are an object; then ``finish_reason`` is ``tool_calls`` (unless
the answer was cut by ``length``) and text outside the calls is ``content`` (null when only
whitespace). If any call is not valid the whole answer stays ``content`` (nothing is
dropped, a half call included); so is an answer of several calls when
``parallel_tool_calls`` is false.

``tool_choice``: ``none`` renders the tools and never parses; ``auto`` parses. adaptr
serve does not constrain decoding, so ``required`` and a named function *prefill* the
answer: the call's opening as the template writes it (found by rendering a probe call) is
appended to the prompt, up to the function's name (``required``: the model chooses the
function) or up to its arguments (named, as vLLM's named-function path); the opening is part
of the parsed answer. A model that then writes no valid call gets its text, opening
included, back as ``content``: a prefilled call is likely, not guaranteed.

Streaming: content streams as it comes; text that may begin a call is held back until it is
known, and from the first call's opening on the answer is held until it ends, then parsed
as above: each call goes out as OpenAI sends it (a delta with its index, id, type and name,
then its arguments), so the openai client rebuilds the same calls as without streaming.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from adaptr.serving.openai.protocol import ParamError

NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # OpenAI's function names (and vLLM's dots)
TOOL_KEYS = {"type", "function"}
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
PROBE_ARGS = {"adaptr_probe_7f3a": 1}
PROBE_NAME = "adaptr_probe_fn"


class NotACall(ValueError):
    """The answer's text is not (only) valid calls: it stays content."""


@dataclass(frozen=True)
class Call:
    """One parsed call: the function's name and its arguments (a JSON object's text)."""

    name: str
    arguments: str
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


@dataclass(frozen=True)
class Parsed:
    """An answer split into its text outside calls (None: none) and its calls."""

    content: str | None
    calls: list[Call]


# ----------------------------------------------------------------- formats
@dataclass(frozen=True)
class ToolFormat:
    """A way models write tool calls: ``split(text)`` gives (outside text, call objects) or
    None when the text holds no call, raising :class:`NotACall` for a broken one;
    ``markers`` may begin a call anywhere, ``leading`` only at the answer's start;
    ``signs``: what a chat template that writes this format contains."""

    name: str
    split: Callable[[str], tuple[str, list[Any]] | None]
    markers: tuple[str, ...] = ()
    leading: tuple[str, ...] = ()
    signs: tuple[str, ...] = ()

    def begins(self, text: str) -> int | None:
        """Where in ``text`` a call begins (None: nowhere yet)."""
        found = [i for m in self.markers if (i := text.find(m)) >= 0]
        if any(text.lstrip().startswith(lead) for lead in self.leading):
            found.append(0)
        return min(found) if found else None

    def hold(self, text: str) -> int:
        """How many characters at the end of ``text`` may be the start of a call."""
        rest = text.lstrip()
        if self.leading and (not rest or any(lead.startswith(rest) for lead in self.leading)):
            return len(text)
        if not rest:
            return len(text)  # leading whitespace: content only once something follows
        held = 0
        for m in self.markers:
            for k in range(min(len(m) - 1, len(text)), held, -1):
                if text.endswith(m[:k]):
                    held = k
                    break
        return len(text) if not text[: len(text) - held].strip() else held


_DECODER = json.JSONDecoder()


def _objects(text: str, sep: str = "") -> list[Any]:
    """``text`` as JSON values one after another (``sep`` between them); NotACall if not."""
    out, i = [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        try:
            value, i = _DECODER.raw_decode(text, i)
        except ValueError:
            raise NotACall(text) from None
        out.append(value)
        while i < len(text) and text[i].isspace():
            i += 1
        if i == len(text):
            return out
        if not sep or text[i] != sep:
            raise NotACall(text)
        i += 1


def _hermes(text: str) -> tuple[str, list[Any]] | None:
    start, end = "<tool_call>", "</tool_call>"
    if start not in text:
        return None
    outside, calls, pos = [], [], 0
    while (i := text.find(start, pos)) >= 0:
        outside.append(text[pos:i])
        j = text.find(end, i)
        if j < 0:  # unterminated: the last call, if its JSON is whole (vLLM's)
            calls += _objects(text[i + len(start) :])
            return "".join(outside), calls
        calls += _objects(text[i + len(start) : j])
        pos = j + len(end)
    if end in text[pos:]:
        raise NotACall(text)
    return "".join(outside) + text[pos:], calls


def _llama3(text: str) -> tuple[str, list[Any]] | None:
    body = text.lstrip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :]
    elif not body.startswith("{"):
        return None
    return "", _objects(body, ";")


def _mistral(text: str) -> tuple[str, list[Any]] | None:
    marker = "[TOOL_CALLS]"
    i = text.find(marker)
    if i >= 0:
        before, rest = text[:i], text[i + len(marker) :]
    elif text.lstrip().startswith("[{"):  # the marker was a special token, skipped
        before, rest = "", text
    else:
        return None
    rest = rest.lstrip()
    try:
        value, end = _DECODER.raw_decode(rest)
    except ValueError:
        raise NotACall(text) from None
    if not isinstance(value, list):
        raise NotACall(text)
    return before + rest[end:], value


DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
_DS_CALL = re.compile(
    "<｜tool▁call▁begin｜>(?P<type>[^<]*?)<｜tool▁sep｜>(?P<name>[^\n]*)\n"
    "```(?:json)?\n(?P<args>.*?)\n```<｜tool▁call▁end｜>",
    re.S,
)


def _deepseek(text: str) -> tuple[str, list[Any]] | None:
    """DeepSeek-V3's own template: the calls between its calls-begin and calls-end tokens, each
    ``function<sep>NAME`` and the arguments in a fenced JSON block (vLLM's deepseek_v3)."""
    i = text.find(DS_BEGIN)
    if i < 0:
        return None
    j = text.find(DS_END, i)
    body = text[i + len(DS_BEGIN) : j if j >= 0 else len(text)]
    after = text[j + len(DS_END) :] if j >= 0 else ""
    calls, pos = [], 0
    for m in _DS_CALL.finditer(body):
        if body[pos : m.start()].strip() or m["type"] != "function":
            raise NotACall(text)
        try:
            calls.append({"name": m["name"], "arguments": json.loads(m["args"])})
        except ValueError:
            raise NotACall(text) from None
        pos = m.end()
    if body[pos:].strip() or not calls:
        raise NotACall(text)
    return text[:i] + after, calls


FORMATS: dict[str, ToolFormat] = {}


def register_format(fmt: ToolFormat) -> None:
    """Add (or replace) a tool-call format, by its name (a family's ``tool_format``)."""
    FORMATS[fmt.name] = fmt


for _fmt in (
    ToolFormat("hermes", _hermes, ("<tool_call>",), (), ("<tool_call>",)),
    ToolFormat("mistral", _mistral, ("[TOOL_CALLS]",), ("[{",), ("[TOOL_CALLS]",)),
    ToolFormat("deepseek_v3", _deepseek, (DS_BEGIN,), (), (DS_BEGIN,)),
    ToolFormat("llama3_json", _llama3, (), ("{", "<|python_tag|>"), ("<|python_tag|>", '"parameters": ')),
):  # fmt: skip
    register_format(_fmt)


def format_for(template: str) -> ToolFormat | None:
    """The tool-call format of ``template``: the family's ``tool_format`` when it is a
    family's own template, else the first format whose signs it shows (None: unknown)."""
    from adaptr.extend.catalog import families

    for family in families().values():
        declared = getattr(family, "tool_format", None)
        if family.chat_template == template and declared:
            if declared not in FORMATS:
                raise ParamError(
                    "tools",
                    f"family {family.name} declares the tool-call format {declared!r}, which adaptr "
                    f"serve cannot parse (known: {', '.join(sorted(FORMATS))})",
                )
            return FORMATS[declared]
    for fmt in FORMATS.values():
        if any(s in template for s in fmt.signs):
            return fmt
    return None


# ----------------------------------------------------------------- the request
@dataclass(frozen=True)
class ToolPlan:
    """What a request's tools ask: ``choice`` is auto, none, required or function (``name``)."""

    tools: list[dict[str, Any]]
    choice: str
    name: str | None = None
    parallel: bool = True
    format: ToolFormat | None = None
    opening: str = ""  # prefilled after the prompt: the start of the answer's text

    @property
    def parsing(self) -> bool:
        return self.choice != "none" and self.format is not None

    def parse(self, text: str) -> Parsed:
        """``text`` (the answer after :attr:`opening`) as content and calls."""
        text = self.opening + text
        if not self.parsing:
            return Parsed(text, [])
        try:
            split = self.format.split(text)
            if split is None:
                return Parsed(text, [])
            outside, objects = split
            calls = [self._call(o) for o in objects]
        except NotACall:
            return Parsed(text, [])
        if not calls or (len(calls) > 1 and not self.parallel):
            return Parsed(text, [])
        return Parsed(outside if outside.strip() else None, calls)

    def _call(self, obj: Any) -> Call:
        names = {t["function"]["name"] for t in self.tools}
        if not isinstance(obj, dict) or obj.get("name") not in names:
            raise NotACall(obj)
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                raise NotACall(obj) from None
        if not isinstance(args, dict) or set(obj) - {"name", "arguments", "parameters"}:
            raise NotACall(obj)
        return Call(obj["name"], json.dumps(args, ensure_ascii=False))

    def finish(self, parsed: Parsed, reason: str) -> str:
        return "tool_calls" if parsed.calls and reason == "stop" else reason


def _function(tool: Any, where: str) -> dict[str, Any]:
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - TOOL_KEYS:
        raise ParamError("tools", f"{where} must be {{'type': 'function', 'function': {{...}}}} (adaptr serve takes function tools)")  # fmt: skip
    fn = tool.get("function")
    if (
        not isinstance(fn, dict)
        or not isinstance(fn.get("name"), str)
        or not NAME.match(fn["name"])
    ):
        raise ParamError("tools", f"{where}.function needs a 'name' of 1-64 letters, digits, _ . : or -")  # fmt: skip
    if set(fn) - FUNCTION_KEYS:
        extra = sorted(str(k)[:60] for k in set(fn) - FUNCTION_KEYS)[0]
        raise ParamError("tools", f"{where}.function: {extra!r} is not a function field (name, description, parameters, strict)")  # fmt: skip
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise ParamError("tools", f"{where}.function.description must be a string")
    if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
        raise ParamError("tools", f"{where}.function.parameters must be a JSON Schema object")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise ParamError("tools", f"{where}.function.strict must be true or false")
    if fn.get("strict"):
        raise ParamError("tools", f"{where}.function.strict: true needs constrained decoding, which adaptr serve's tool calls do not have; send false or leave it out")  # fmt: skip
    return {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}


def parse_tools(body: dict) -> ToolPlan | None:
    """The request's ``tools``, ``tool_choice`` and ``parallel_tool_calls`` checked (a
    :class:`ParamError` names the bad one); None when it has no tools and choice none/auto."""
    raw, choice = body.get("tools"), body.get("tool_choice")
    if raw is not None and not isinstance(raw, list):
        raise ParamError("tools", "'tools' must be a list of function tools")
    tools = [_function(t, f"tools[{i}]") for i, t in enumerate(raw or [])]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) < len(names):
        raise ParamError("tools", "two tools have the same function name")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise ParamError("parallel_tool_calls", "'parallel_tool_calls' must be true or false")
    name = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if choice.get("type") != "function" or set(choice) != {"type", "function"} or not isinstance(fn, dict) or set(fn) != {"name"} or not isinstance(fn["name"], str):  # fmt: skip
            raise ParamError("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': NAME}}")  # fmt: skip
        name, choice = fn["name"], "function"
        if name not in names:
            raise ParamError("tool_choice", f"'tool_choice' names the function {name[:64]!r}, which is not among the request's tools")  # fmt: skip
    elif choice not in ("none", "auto", "required"):
        raise ParamError("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': NAME}}")  # fmt: skip
    if choice == "required" and not tools:
        raise ParamError("tool_choice", "'tool_choice': 'required' needs 'tools'")
    if not tools:
        return None
    return ToolPlan(tools, choice, name, parallel is not False)


# ------------------------------------------------------------- rendering
def plan_for(
    plan: ToolPlan, render: Callable[..., str], messages: list[dict], template: str
) -> tuple[ToolPlan, str]:
    """``plan`` with its format and opening for ``template``, and the prompt: ``render``
    is ``apply_chat_template`` on that template (``render(messages, tools, generation)``)."""
    prompt = render(messages, plan.tools, True)
    if prompt == render(messages, None, True):
        raise ParamError("tools", "the chat template ignores 'tools' (it renders the same without them), so the model would not see them; serve an adapter trained with a template that renders tools")  # fmt: skip
    fmt = format_for(template)
    if fmt is None and plan.choice != "none":
        raise ParamError("tools", "adaptr serve does not know how this chat template writes tool calls (set tool_format on its model family); send 'tool_choice': 'none' to render the tools without parsing calls")  # fmt: skip
    opening = ""
    if plan.choice in ("required", "function"):
        opening = _opening(plan, render, messages, prompt)
    return ToolPlan(
        plan.tools, plan.choice, plan.name, plan.parallel, fmt, opening
    ), prompt + opening


def check_history(render: Callable[..., str], messages: list[dict], tools: list | None) -> None:
    """Refuse a conversation whose tool calls the chat template does not render (training's
    check_template refuses such a template too): the model would answer without them."""
    if any(m.get("tool_calls") for m in messages):
        bare = [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        if render(messages, tools, True) == render(bare, tools, True):
            raise ParamError("messages", "the chat template drops the assistant's tool_calls (it renders the same without them); serve an adapter trained with a template that renders tool calls")  # fmt: skip


def _opening(plan: ToolPlan, render: Callable[..., str], messages: list[dict], prompt: str) -> str:
    """The start of a call as the template writes it: up to the function's name
    (``required``) or up to its arguments (a named function)."""
    name = plan.name or PROBE_NAME
    call = {"type": "function", "function": {"name": name, "arguments": PROBE_ARGS}}
    probe = messages + [{"role": "assistant", "content": "", "tool_calls": [call]}]
    full = render(probe, plan.tools, False)
    args = json.dumps(PROBE_ARGS)
    cut = full.find(args) if plan.name else full.find(name)
    if not full.startswith(prompt) or cut < len(prompt):
        raise ParamError("tool_choice", f"'tool_choice': {plan.choice!r} prefills the call's opening, and this chat template does not write a call after the conversation's prompt; use 'auto'")  # fmt: skip
    return full[len(prompt) : cut]


# ------------------------------------------------------------- streaming
class ToolStream:
    """One choice's streamed answer: :meth:`feed` gives the content to send now (text that
    may begin a call is held); :meth:`end` the rest of the content and the calls."""

    def __init__(self, plan: ToolPlan):
        self.plan, self.text, self.sent, self.inside = plan, plan.opening, 0, False

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.inside or not self.plan.parsing:
            return self._send(len(self.text)) if not self.inside else ""
        cut = self.plan.format.begins(self.text)
        if cut is not None:
            self.inside = True
            return self._send(cut) if self.text[:cut].strip() else ""
        return self._send(len(self.text) - self.plan.format.hold(self.text))

    def _send(self, upto: int) -> str:
        out, self.sent = self.text[self.sent : upto], max(self.sent, upto)
        return out

    def end(self) -> tuple[str, Parsed]:
        """The content not sent yet, and the answer parsed (as without streaming)."""
        parsed = self.plan.parse(self.text[len(self.plan.opening) :])
        content = parsed.content or ""
        rest = content[self.sent :] if content.startswith(self.text[: self.sent]) else ""
        return rest, parsed
