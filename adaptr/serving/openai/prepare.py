"""A request's body made into scheduler requests: parsed and checked (prompts, messages,
parameters), its ``model`` resolved to an adapter ref, its prompts templated and tokenized
(on a worker thread), then one :class:`Job` per choice.

A job's events (text pieces, its end or error) come from the worker thread and are put on
the asyncio queue ``out`` of its request (shared by the request's choices) for the
request's handler, as ``(index, kind, value, logprobs)``: ``logprobs`` is how many of the
job's :attr:`~adaptr.serving.requests.Request.token_logprobs` the text so far covers.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Any

from adaptr.errors import InvalidInputError, NotFoundError
from adaptr.serving.constrain import Grammar, compile_format
from adaptr.serving.openai.context import AppContext
from adaptr.serving.openai.protocol import ParamError, RequestParams, parse_params
from adaptr.serving.openai.tools import ToolPlan, check_history, parse_tools, plan_for
from adaptr.serving.requests import Event, Request

MAX_CHOICES = 128  # prompts x n in one request

LEGACY = (
    "legacy function calling ('function' messages, 'function_call') is not supported: send "
    "the calls as an assistant's 'tool_calls' and each result as a 'tool' message"
)
NOT_TEXT = "content parts are not supported: adaptr serves text models; send {'type': 'text', 'text': ...} parts"  # fmt: skip
# part types that are not text, by what they hold
_MEDIA = {"image_url": "image", "image": "image", "input_image": "image", "input_audio": "audio",
          "audio_url": "audio", "audio": "audio", "video_url": "video", "file": "file",
          "input_file": "file"}  # fmt: skip
# what the openai client sends back with an answer's message (model_dump()): null or empty
# they carry nothing; anything else in them is refused, never dropped
_EMPTY = {"tool_calls": (None, []), "function_call": (None,), "tool_call_id": (None,),
          "refusal": (None,), "audio": (None,), "annotations": (None, [])}  # fmt: skip


@dataclass
class Prompt:
    text: str  # as sent, or the token ids decoded (what ``echo`` repeats)
    ids: list[int]


@dataclass
class Prepared:
    """A request checked, resolved and tokenized."""

    model: str  # as asked (the answer names it)
    adapter: str | None  # its adapter ref (None: the bare base)
    params: RequestParams
    prompts: list[Prompt]
    grammar: Grammar | None = None  # its response_format compiled (None: text)
    tools: ToolPlan | None = None  # its tools, to parse the answers' calls (None: no tools)


@dataclass(eq=False)
class Job(Request):
    """A choice of an HTTP request: its events go to ``out`` on the app's event ``loop``."""

    loop: asyncio.AbstractEventLoop | None = None
    out: asyncio.Queue = field(default_factory=asyncio.Queue)
    index: int = 0  # its choice's index in the answer
    prompt_index: int = 0  # its prompt's, in the request's prompts
    chat: bool = False  # a chat completion (log-probabilities in chat's shape)
    text_offset: int = 0  # where its next log-probabilities' tokens begin in its text
    as_ids: bool = False  # tokens named token_id:N in its log-probabilities
    scorer: Job | None = None  # the choice of its prompt that scores the prompt (None: itself)

    def __post_init__(self) -> None:
        self.on_event = self._to_loop

    def _to_loop(self, event: Event) -> None:
        # (on the worker thread, as the event happens: the count of entries matches the text)
        item = (self.index, *event, len(self.token_logprobs))
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)


# ------------------------------------------------------------------ the body
def parse_body(raw: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidInputError("the request body is nested too deeply") from None
    except ValueError:  # not JSON, not UTF-8, an integer of too many digits
        raise InvalidInputError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise InvalidInputError("the request body must be a JSON object")
    return body


def check_text(value: str, param: str) -> str:
    """``value``, if it is valid Unicode (no lone surrogate)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ParamError(param, f"'{param}' is not valid Unicode (a lone surrogate)") from None
    return value


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_prompts(prompt: Any) -> list[str | list[int]]:
    """``prompt`` as a list of prompts, each a string or token ids (OpenAI's four forms)."""
    if isinstance(prompt, str):
        prompts: list = [prompt]
    elif _is_ids(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):  # fmt: skip
        prompts = prompt
    else:
        raise ParamError(
            "prompt",
            "'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids",  # fmt: skip
        )
    if len(prompts) > MAX_CHOICES:
        raise ParamError("prompt", f"at most {MAX_CHOICES} prompts per request")
    for p in prompts:
        if not p:
            raise ParamError(
                "prompt", "'prompt' is empty" if len(prompts) == 1 else "a prompt is empty"
            )
        if isinstance(p, str):
            check_text(p, "prompt")
    return prompts


def _content(content: Any, where: str) -> str:
    """A message's content as text: a string, or text parts joined by newlines (as vLLM)."""
    if isinstance(content, str):
        return check_text(content, "messages")
    if not isinstance(content, list):
        raise ParamError("messages", f"{where}: 'content' must be a string or a list of text parts")  # fmt: skip
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in _MEDIA:
            raise ParamError("messages", f"{where}: {_MEDIA[kind]} {NOT_TEXT}")
        if kind == "refusal":
            raise ParamError("messages", f"{where}: refusal content parts are not supported; send the assistant's text as a text part")  # fmt: skip
        if kind != "text" or not isinstance(part.get("text"), str) or set(part) != {"type", "text"}:  # fmt: skip
            raise ParamError("messages", f"{where}: a content part must be {{'type': 'text', 'text': a string}} and nothing else")  # fmt: skip
        texts.append(check_text(part["text"], "messages"))
    return "\n".join(texts)


def _check_fields(m: dict, where: str) -> None:
    """A message holds role, content and name (an assistant's ``tool_calls``, a tool
    result's ``tool_call_id``), and nothing else that carries something."""
    role = m["role"]
    if role == "function":
        raise ParamError("messages", f"{where}: {LEGACY}")
    for key, value in m.items():
        if key in ("role", "content", "name") or (key in _EMPTY and value in _EMPTY[key]):
            continue
        if (key, role) in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
            continue
        if key == "function_call":
            raise ParamError("messages", f"{where}: {LEGACY}")
        if key in ("tool_calls", "tool_call_id"):
            owner = "an assistant" if key == "tool_calls" else "a 'tool'"
            raise ParamError("messages", f"{where}: '{key}' belongs on {owner} message, not a {role[:20]!r} one")  # fmt: skip
        if key == "audio":
            raise ParamError("messages", f"{where}: 'audio' is not supported: adaptr serves text models")  # fmt: skip
        shown = key[:60] if isinstance(key, str) else repr(key)
        raise ParamError(
            "messages",
            f"{where}: '{shown}' is not a message field adaptr serve takes (role, content, name, tool_calls, tool_call_id)",  # fmt: skip
        )


def _tool_fields(m: dict, where: str, message: dict) -> None:
    """An assistant's ``tool_calls`` normalised as training has them (arguments as objects,
    :func:`adaptr.data.chat.tool_calls`); a tool result's ``tool_call_id``."""
    from adaptr.data.chat import tool_calls
    from adaptr.extend.types import MissingField

    if m["role"] == "assistant" and m.get("tool_calls"):
        if not isinstance(m["tool_calls"], list):
            raise ParamError("messages", f"{where}: 'tool_calls' must be a list of calls")
        try:
            message["tool_calls"] = tool_calls(m["tool_calls"], f"{where}.tool_calls")
        except MissingField as e:
            raise ParamError("messages", str(e)) from None
    if m["role"] == "tool":
        if not isinstance(m.get("tool_call_id"), str) or not m["tool_call_id"]:
            raise ParamError("messages", f"{where}: a 'tool' message needs the 'tool_call_id' of the call it answers")  # fmt: skip
        message["tool_call_id"] = check_text(m["tool_call_id"], "messages")


def parse_messages(messages: Any) -> list[dict]:
    """``messages`` as the chat template takes them: role, text content (a list of text
    parts is joined), ``name`` when given (a key of the message, as vLLM passes it), an
    assistant's ``tool_calls`` and a tool result's ``tool_call_id`` and ``name`` (its call's,
    as training names it: :func:`adaptr.data.chat.name_tool_results`)."""
    from adaptr.data.chat import name_tool_results

    if not isinstance(messages, list) or not messages:
        raise ParamError(
            "messages",
            "'messages' must be a non-empty list of {role, content}, content a string or a list of text parts",  # fmt: skip
        )
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ParamError("messages", f"{where} must be an object with a string 'role' and a 'content'")  # fmt: skip
        _check_fields(m, where)
        calls = m["role"] == "assistant" and m.get("tool_calls")
        content = "" if calls and m.get("content") is None else _content(m.get("content"), where)
        message = {"role": check_text(m["role"], "messages"), "content": content}
        _tool_fields(m, where, message)
        if m.get("name") is not None:
            if not isinstance(m["name"], str) or not m["name"]:
                raise ParamError("messages", f"{where}: 'name' must be a non-empty string")
            message["name"] = check_text(m["name"], "messages")
        out.append(message)
    name_tool_results(out)
    return out


# ---------------------------------------------------------------- the model
def unknown_model(ctx: AppContext, model: str) -> NotFoundError:
    base = ctx.server.base_key
    return NotFoundError(
        f"the model {model[:100]!r} does not exist: name an adapter of base "
        f"{base} (NAME, NAME@VERSION, NAME@TAG; GET /v1/models lists them), {base!r} or 'active'"
    )


def resolve(ctx: AppContext, model: Any) -> str | None:
    """The adapter ref ``model`` names (None: the bare base)."""
    server, registry = ctx.server, ctx.server.registry
    if not isinstance(model, str) or not model:
        raise ParamError("model", "'model' must name an adapter, the base, or 'active'")
    if model == server.base_key:
        return None
    if model == "active":
        refs = registry.active(server.base_key).get(server.base_key, [])
        if len(refs) > 1:
            raise ParamError(
                "model",
                "several adapters are active (stacked); stacked adapters are not served per row",
            )
        return registry.get(refs[0]).ref if refs else None
    try:
        v = registry.get(model)
    except InvalidInputError:  # not a ref (Ref.parse: ASCII digits, int64 versions, ...)
        raise unknown_model(ctx, model) from None
    if v.base != server.base_key:
        raise NotFoundError(f"{model} is an adapter of base {v.base}, not of {server.base_key}")
    return v.ref


def model_ids(ctx: AppContext) -> list[str]:
    """What ``model`` may name: the base, and each adapter of it by name, ref and tags."""
    base = ctx.server.base_key
    ids = [base]
    for v in ctx.server.registry.list():
        if v.base == base:
            ids += [v.name, v.ref] + [f"{v.name}@{t}" for t in v.tags]
    return list(dict.fromkeys(ids))


# -------------------------------------------------------------- the prompts
def prepare(ctx: AppContext, raw: bytes, chat: bool) -> Prepared:
    """The request's body checked, resolved and tokenized (on a worker thread)."""
    body = parse_body(raw)
    adapter = resolve(ctx, body.get("model"))
    p = parse_params(body, chat)
    tools = None
    if chat:
        prompt, tools = _chat_prompt(ctx, body, adapter)
        param, prompts = "messages", [prompt]
        if tools and tools.parsing and p.response_format is not None:
            raise ParamError("response_format", "a JSON 'response_format' cannot be combined with tool calls; send 'tool_choice': 'none' or no 'response_format'")  # fmt: skip
    else:
        param, prompts = "prompt", parse_prompts(body.get("prompt"))
    if len(prompts) * p.n > MAX_CHOICES:
        raise ParamError("n", f"prompts x n must be at most {MAX_CHOICES}")
    grammar = None
    if p.response_format is not None:  # (compiled here, off the loop and the scheduler; cached)
        try:
            grammar = compile_format(ctx.server.tokenizer, ctx.vocab, p.response_format)
        except InvalidInputError as e:
            raise ParamError("response_format", str(e)) from None
    prompts = [tokens(ctx, x, chat, param, p) for x in prompts]
    return Prepared(body["model"], adapter, p, prompts, grammar, tools)


def _chat_prompt(ctx: AppContext, body: dict, adapter: str | None) -> tuple[str, ToolPlan | None]:
    """The messages (and tools) through the chat template ``adapter`` trained with, and the
    request's tools planned for that template (:mod:`~adaptr.serving.openai.tools`)."""
    plan = parse_tools(body)
    messages = parse_messages(body.get("messages"))
    try:
        template = ctx.server.chat_template(adapter)
    except InvalidInputError as e:
        raise ParamError("messages", str(e)) from None

    def render(messages: list[dict], tools: list | None, generation: bool) -> str:
        try:
            return ctx.server.tokenizer.apply_chat_template(
                messages, tools=tools, chat_template=template, tokenize=False,
                add_generation_prompt=generation,
            )  # fmt: skip
        except Exception as e:
            raise ParamError("messages", f"cannot apply the chat template: {e}") from None

    check_history(render, messages, plan.tools if plan else None)
    if plan is None:
        return render(messages, None, True), None
    plan, prompt = plan_for(plan, render, messages, template)
    return prompt, plan


def tokens(
    ctx: AppContext, prompt: str | list[int], chat: bool, param: str, p: RequestParams
) -> Prompt:
    """One prompt as token ids, checked against the vocabulary and the context."""
    code, window, tokenizer = "context_length_exceeded", ctx.window, ctx.server.tokenizer
    if isinstance(prompt, str):
        if window and len(prompt) > window * ctx.longest:
            raise ParamError(
                param,
                f"the prompt ({len(prompt)} characters) exceeds the context of {window} tokens",
                code,
            )
        text, ids = prompt, tokenizer(prompt, add_special_tokens=not chat).input_ids
    else:
        if not all(0 <= t < ctx.vocab for t in prompt):
            raise ParamError(param, f"a token id is outside the vocabulary (0 to {ctx.vocab - 1})")
        text, ids = tokenizer.decode(prompt, skip_special_tokens=True), prompt
    if window and len(ids) + p.max_tokens > window:
        raise ParamError(
            param if len(ids) >= window else "max_tokens",
            f"the prompt has {len(ids)} tokens; with max_tokens={p.max_tokens} it exceeds the context of {window}",  # fmt: skip
            code,
        )
    return Prompt(text, ids)


def jobs_for(req: Prepared, chat: bool) -> list[Job]:
    """One job per choice: each prompt ``n`` times (choice j's seed: ``seed + j``); on the
    event loop, whose queue gets their events."""
    p = req.params
    loop, out = asyncio.get_running_loop(), asyncio.Queue()
    jobs: list[Job] = []
    for i, prompt in enumerate(req.prompts):
        scorer = None  # the choice that scores the prompt for all its choices (echo)
        for j in range(p.n):
            seed = None if p.seed is None else (p.seed + j) % 2**63
            job = Job(prompt.ids, req.adapter, p.max_tokens, replace(p.sampling, seed=seed),
                      p.stop, logprobs=p.logprobs,
                      prompt_logprobs=p.echo and p.logprobs is not None and scorer is None,
                      ignore_eos=p.ignore_eos, min_tokens=p.min_tokens, as_ids=p.as_ids,
                      constraint=req.grammar.guide() if req.grammar else None,
                      loop=loop, out=out, index=len(jobs), prompt_index=i, chat=chat)  # fmt: skip
            job.scorer, scorer = scorer, scorer or job
            jobs.append(job)
    return jobs
