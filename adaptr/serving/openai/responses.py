"""A request's answer from its jobs' events: one JSON body (once every choice has ended),
or SSE chunks as the text comes; either way a client that went away cancels its jobs."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from starlette.requests import ClientDisconnect

from adaptr.errors import AdaptrError
from adaptr.serving.openai import logprobs as logprob_shapes
from adaptr.serving.openai.context import AppContext
from adaptr.serving.openai.errors import error_response
from adaptr.serving.openai.http import error_body
from adaptr.serving.openai.logprobs import TokenTexts
from adaptr.serving.openai.prepare import Job, Prepared, Prompt
from adaptr.serving.openai.tools import Call, ToolStream

log = logging.getLogger("adaptr.serving.openai.app")  # (one logger for the app's lines)


@dataclass
class Reply:
    """The OpenAI-shaped answers to one request (its choices): whole, or as SSE chunks."""

    id: str
    model: str
    chat: bool
    prompt_tokens: int
    finished: bool = False  # the whole stream went out

    def _body(self, choices: list, **extra: Any) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": int(time.time()), "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def choice(
        self, index: int, text: str | None, reason: str, logprobs: dict | None,
        calls: list[Call] | None = None,
    ) -> dict:  # fmt: skip
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            if calls:
                choice["message"]["tool_calls"] = [c.to_dict() for c in calls]
        else:
            choice["text"] = text
        return choice

    def whole(self, choices: list[dict], completion_tokens: int) -> dict:
        return self._body(choices, usage=self.usage(completion_tokens))

    def _sse(self, body: dict) -> str:
        if self.chat:
            body["object"] = "chat.completion.chunk"
        return "data: " + json.dumps(body) + "\n\n"

    def chunk(
        self, index: int, delta: str | dict | None, reason: str | None, logprobs: dict | None = None
    ) -> str:
        """One SSE event of choice ``index``: new text (or the chat's opening role), or the
        finish reason; with the log-probabilities of the tokens it covers."""
        choice: dict[str, Any] = {"index": index, "finish_reason": reason, "logprobs": logprobs}
        if self.chat:
            choice["delta"] = (
                delta if isinstance(delta, dict) else {"content": delta} if delta else {}
            )
        else:
            choice["text"] = delta or ""
        return self._sse(self._body([choice]))

    def usage_chunk(self, completion_tokens: int) -> str:
        """The last event when ``stream_options.include_usage``: no choices, the usage."""
        return self._sse(self._body([], usage=self.usage(completion_tokens)))


class JobStream(StreamingResponse):
    """The SSE answer of one request: however it ends (its end, the client gone), its jobs'
    rows stop, and a client that went away is logged in one line."""

    def __init__(self, content: AsyncIterator[str], jobs: list[Job], reply: Reply):
        super().__init__(content, media_type="text/event-stream")
        self.jobs, self.reply = jobs, reply

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            for job in self.jobs:
                job.cancel()
            if not self.reply.finished:
                log.info("%s: the client disconnected; its stream is stopped", self.reply.id)


def job_logprobs(
    texts: TokenTexts, job: Job, upto: int, since: int = 0, prompt: Prompt | None = None
) -> dict | None:
    """Choice ``job``'s log-probabilities of its tokens ``since:upto`` (with ``prompt``, its
    prompt's first: echo), in its endpoint's shape; text offsets continue from the last call."""
    if job.logprobs is None:
        return None
    entries: list = job.token_logprobs[since:upto]
    if job.chat:
        return logprob_shapes.chat(entries, texts, job.as_ids)
    ids = [e.token for e in entries]
    if prompt is not None:  # (scored once per prompt: by its first choice, prefilled by now)
        scored = (job.scorer or job).prompt_token_logprobs or [None] * len(prompt.ids)
        ids, entries = prompt.ids + ids, list(scored) + entries
    out = logprob_shapes.completion(ids, entries, texts, job.text_offset, job.as_ids)
    job.text_offset += sum(len(texts.text(t)) for t in ids)
    return out


async def events(jobs: list[Job]) -> AsyncIterator[tuple[Job, str, Any, int]]:
    """The jobs' events as they come, ``(job, kind, value, entries)``, until every job ended."""
    out = jobs[0].out
    running = len(jobs)
    while running:
        index, kind, value, entries = await out.get()
        if kind == "error":
            raise value
        running -= kind == "end"
        yield jobs[index], kind, value, entries


async def disconnected(request: Request) -> None:
    """Returns once the client has gone away."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # not expected once the body is read; no busy loop


async def _collect(jobs: list[Job]) -> tuple[dict[int, str], dict[int, str]]:
    """Each choice's text and finish reason, once all have ended."""
    text = {job.index: "" for job in jobs}
    reasons: dict[int, str] = {}
    async for job, kind, value, _ in events(jobs):
        if kind == "text":
            text[job.index] += value
        else:
            reasons[job.index] = value
    return text, reasons


def _whole_body(
    ctx: AppContext, jobs: list[Job], req: Prepared, reply: Reply,
    text: dict[int, str], reasons: dict[int, str],
) -> str:  # fmt: skip
    """The answer's JSON (off the loop: log-probabilities can make it megabytes)."""
    choices = []
    for job in jobs:
        echo = req.prompts[job.prompt_index] if req.params.echo else None
        lp = job_logprobs(ctx.texts, job, len(job.token_logprobs), 0, echo)
        full = (echo.text if echo else "") + text[job.index]
        if req.tools is not None:  # (chat) its calls parsed from the answer
            parsed = req.tools.parse(full)
            reason = req.tools.finish(parsed, reasons[job.index])
            choices.append(reply.choice(job.index, parsed.content, reason, lp, parsed.calls))
            continue
        choices.append(reply.choice(job.index, full, reasons[job.index], lp))
    return json.dumps(reply.whole(choices, sum(job.completion_tokens for job in jobs)))


async def whole(
    ctx: AppContext, request: Request, jobs: list[Job], req: Prepared, reply: Reply
) -> Response:
    """The answer once every choice has ended, unless the client goes away before."""
    work = asyncio.ensure_future(_collect(jobs))
    gone = asyncio.ensure_future(disconnected(request))
    gone.add_done_callback(lambda t: t.cancelled() or t.exception())  # (retrieved)
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for job in jobs:
            job.cancel()  # nothing more is read: its row leaves, or it never starts
        gone.cancel()
        answered = work.done()
        if not answered:
            work.cancel()
    if not answered:
        log.info("%s: the client disconnected; its request is cancelled", reply.id)
        return error_response(400, "the client disconnected")  # nobody reads it
    body = await ctx.off_loop(_whole_body, ctx, jobs, req, reply, *work.result())
    return Response(body, media_type="application/json")


async def stream(
    ctx: AppContext, jobs: list[Job], req: Prepared, reply: Reply
) -> AsyncIterator[str]:
    """SSE chunks of every choice as its text comes (the scheduler decodes incrementally
    and holds back text that could begin a stop string; a stop string ends the choice's
    row and is not part of its text), each with the log-probabilities of its tokens."""
    p, texts = req.params, ctx.texts
    covered = {job.index: 0 for job in jobs}  # token log-probabilities sent so far
    calls = {job.index: ToolStream(req.tools) for job in jobs} if req.tools else {}
    echoed: set[int] = set()
    try:
        for job in jobs:
            if reply.chat:
                yield reply.chunk(job.index, {"role": "assistant"}, None)
        async for job, kind, value, entries in events(jobs):
            if p.echo and job.index not in echoed:  # its prompt is scored by now (prefill)
                echoed.add(job.index)
                prompt = req.prompts[job.prompt_index]
                yield reply.chunk(job.index, prompt.text, None, job_logprobs(texts, job, 0, 0, prompt))  # fmt: skip
            if job.index in calls:  # content held while it may be a call; the calls at the end
                for chunk in _tool_chunks(reply, job, calls[job.index], kind, value, texts, entries, covered):  # fmt: skip
                    yield chunk
                continue
            lp = job_logprobs(texts, job, entries, covered[job.index])
            if kind == "text":
                yield reply.chunk(job.index, value, None, lp)
            else:
                yield reply.chunk(job.index, None, value, None if lp is not None and not any(lp.values()) else lp)  # fmt: skip
            covered[job.index] = entries
        if p.include_usage:
            yield reply.usage_chunk(sum(job.completion_tokens for job in jobs))
        yield "data: [DONE]\n\n"
    except AdaptrError as e:  # the request's own fault (a schema past the parser's limits)
        log.info("request %s refused while streaming: %s", reply.id, e)
        body = error_body(400, str(e), getattr(e, "param", None), getattr(e, "code", None))
        yield "data: " + body.decode() + "\n\n"
    except Exception as e:  # headers are sent: the error goes in the stream
        log.exception("request %s failed while streaming", reply.id)
        yield "data: " + error_body(500, f"generation failed: {e}").decode() + "\n\n"
    reply.finished = True


def _tool_chunks(
    reply: Reply, job: Job, tools: ToolStream, kind: str, value: Any,
    texts: TokenTexts, entries: int, covered: dict[int, int],
) -> list[str]:  # fmt: skip
    """The SSE chunks of one event of a choice whose answer may hold tool calls: content
    once it cannot begin a call (log-probabilities go with it), and at its end the rest of
    the content, each call (its id, type and name, then its arguments) and the reason."""
    out = []
    if kind == "text":
        content = tools.feed(value)
        if content:
            out.append(reply.chunk(job.index, content, None, job_logprobs(texts, job, entries, covered[job.index])))  # fmt: skip
            covered[job.index] = entries
        return out
    rest, parsed = tools.end()
    lp = job_logprobs(texts, job, entries, covered[job.index])
    if rest:
        out.append(reply.chunk(job.index, rest, None, lp))
        lp = None
    for k, call in enumerate(parsed.calls):
        head = {"index": k, "id": call.id, "type": "function",
                "function": {"name": call.name, "arguments": ""}}  # fmt: skip
        out.append(reply.chunk(job.index, {"tool_calls": [head]}, None))
        args = {"index": k, "function": {"arguments": call.arguments}}
        out.append(reply.chunk(job.index, {"tool_calls": [args]}, None))
    empty = lp is not None and not any(lp.values())
    out.append(reply.chunk(job.index, None, tools.plan.finish(parsed, value), None if empty else lp))
    covered[job.index] = entries
    return out
