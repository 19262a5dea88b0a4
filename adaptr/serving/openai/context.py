"""What the app's handlers share: the served :class:`AdapterServer`, its scheduler while the
app runs, the request limits and what is measured once from the model and tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from adaptr.bases import context_window
from adaptr.serving.openai.errors import HTTPRefusal
from adaptr.serving.openai.logprobs import TokenTexts

if TYPE_CHECKING:
    from adaptr.serving.scheduler import Scheduler
    from adaptr.serving.server import AdapterServer

T = TypeVar("T")


@dataclass
class Limits:
    """What one request may take; read on every request (a live app's limits may change)."""

    max_body_bytes: int = 4 * 2**20
    body_timeout_s: float = 30.0  # for the whole body to arrive once the headers have


@dataclass
class AppContext:
    """The state of one app (``app.state.context``); ``scheduler`` and ``workers`` are set
    while the app runs (its lifespan): the server's scheduler, and the threads that parse,
    template and tokenize off the event loop."""

    server: AdapterServer
    limits: Limits
    window: int | None  # the model's context in tokens (None: RoPE scaling leaves it unbounded)
    longest: int  # characters of the vocabulary's longest token
    vocab: int  # token ids are 0 to vocab - 1
    texts: TokenTexts  # each token's text (log-probabilities)
    scheduler: Scheduler | None = None
    workers: ThreadPoolExecutor | None = None
    stopping: bool = False  # its shutdown began (GET /health: 503)
    metrics: Any = None  # its own prometheus CollectorRegistry (GET /metrics; made on first use)

    @classmethod
    def of(cls, server: AdapterServer, limits: Limits) -> AppContext:
        # no token covers more characters than the longest in the vocabulary (tokenizers do
        # not drop characters), so a prompt past window * longest characters cannot fit
        return cls(
            server,
            limits,
            window=context_window(server.model.config),
            longest=max(map(len, server.tokenizer.get_vocab()), default=1),
            vocab=server.model.get_input_embeddings().weight.shape[0],
            texts=TokenTexts(server.tokenizer),
        )

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the app's workers."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)


def context_of(request: Request) -> AppContext:
    """The context of the app serving ``request``."""
    return request.app.state.context


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request's body, within ``limits`` (a 413 past its size, a 408 past its time)."""
    too_large = HTTPRefusal(
        413,
        f"the request body is larger than {limits.max_body_bytes} bytes "
        "(adaptr serve --max-body-mb sets the limit)",
        "request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if (
        declared.isascii()
        and declared.isdigit()
        and (len(declared) > 15 or int(declared) > limits.max_body_bytes)
    ):
        raise too_large  # at once, before the body
    chunks: list[bytes] = []
    size = 0

    async def read() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout_s)
    except asyncio.TimeoutError:
        raise HTTPRefusal(
            408, f"the request body did not arrive within {limits.body_timeout_s:g} s"
        ) from None
    return b"".join(chunks)
