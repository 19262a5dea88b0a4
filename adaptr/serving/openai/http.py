"""uvicorn's h11 protocol with deadlines no client can stretch, and OpenAI-shaped answers.

uvicorn closes an idle keep-alive connection, but a client that sends its request line
and headers a byte at a time (slowloris) holds its connection, and one of the server's
``--max-connections``, for as long as it likes. Here a request's headers must be complete
within :data:`HEADER_TIMEOUT_S` of its first byte (of the connection, for the first
request); past that the connection is closed. The body has its own deadline while the app
reads it (:attr:`~adaptr.serving.openai.context.Limits.body_timeout_s`, a 408).

An answer given without reading the body (a 401 without the key, a 404, a GET with a body)
leaves the rest of the body to come: it is read and dropped for at most :data:`DRAIN_S`,
and the connection is closed if it has not all come by then. A connection waiting for the
rest of such a body does not count against ``--max-connections``: clients that trickle
bodies no one asked for cannot lock out the others. Once the body is in, the connection is
an idle keep-alive one again (closed after uvicorn's ``timeout_keep_alive``).

The answers the protocol itself gives are OpenAI-shaped JSON (``{"error": {"message",
"type", "param", "code"}}``) like the app's: the 400 for a request that is not HTTP/1.1 and
the 503 past ``--max-connections`` (counted here, in place of uvicorn's count: exactly
``--max-connections`` connections are served at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

HEADER_TIMEOUT_S = 10.0
DRAIN_S = 5.0  # for the rest of a body nobody reads (an answer went out before it)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this

log = logging.getLogger(__name__)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:  # fmt: skip
    """OpenAI's error shape, as ASCII JSON (a message may quote the client's text, lone
    surrogates included)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return json.dumps(body).encode()


def uvicorn_settings(**config: Any) -> dict[str, Any]:
    """``uvicorn.Config`` settings for adaptr serve: this guarded protocol, no WebSocket
    upgrade (it would leave the protocol and its deadlines), the keep-alive timeout;
    ``config`` overrides them (``limit_concurrency`` is ``--max-connections``)."""
    return {"http": GuardedH11Protocol, "ws": "none", "timeout_keep_alive": KEEP_ALIVE_S, **config}


def uvicorn_server(app: Any, **config: Any) -> uvicorn.Server:
    """A uvicorn server for ``app`` with adaptr serve's settings (:func:`uvicorn_settings`;
    ``log_level`` is ``"warning"`` unless given); ``config`` goes to ``uvicorn.Config``."""
    settings = uvicorn_settings(**{"log_level": "warning", **config})
    return uvicorn.Server(uvicorn.Config(app, **settings))


class GuardedH11Protocol(H11Protocol):
    """:class:`H11Protocol` whose connections no client holds past their deadlines."""

    header_timeout_s = HEADER_TIMEOUT_S
    drain_s = DRAIN_S
    _header_timer: asyncio.TimerHandle | None = None
    _drain_timer: asyncio.TimerHandle | None = None
    _drained: object = None  # the request cycle whose body is being dropped

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's own check counts every connection; here those draining a body do not
        self.most, self.limit_concurrency = self.limit_concurrency, None
        self._app, self.app = self.app, self._admit

    @property
    def draining(self) -> bool:
        """Whether the connection only waits for the rest of a body nobody reads."""
        return self._drain_timer is not None

    def connection_made(self, transport) -> None:  # noqa: ANN001
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.transport.is_closing():
            return
        if self.draining and not self._still_draining():
            self._stop_draining()  # the body is all in: an idle keep-alive connection again
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                self._unset_keepalive_if_required()
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler
                )
                return
        if self.conn.their_state is h11.IDLE:
            if self._header_timer is None:  # the first bytes of the next request
                self._arm()
        else:
            self._disarm()  # its headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_draining()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # (the keep-alive timeout watches the idle connection now)
        # (read before uvicorn's: with the request all in, it may begin a pipelined next one)
        unread = self.conn.their_state is h11.SEND_BODY
        super().on_response_complete()
        if unread and not self.transport.is_closing():
            # answered before its body came (401, 404, a GET with a body): the rest is
            # dropped as it comes, for a while; the keep-alive timer would be reset by each byte
            self._unset_keepalive_if_required()
            self._drained = self.cycle
            self._drain_timer = self.loop.call_later(self.drain_s, self._drained_late)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request h11 cannot parse, OpenAI-shaped."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # (its app's answer goes nowhere)
            self.cycle.message_event.set()
        if self.conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):  # answered already
            self.transport.close()
            return
        message = "invalid HTTP request: its request line, headers or body framing is not valid HTTP/1.1"  # fmt: skip
        body = error_body(400, message)
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        for event in (h11.Response(status_code=400, headers=headers, reason=STATUS_PHRASES[400]),
                      h11.Data(data=body), h11.EndOfMessage()):  # fmt: skip
            self.transport.write(self.conn.send(event))
        self.transport.close()

    async def _admit(self, scope, receive, send) -> None:  # noqa: ANN001
        """The app, or a 503 when more than ``--max-connections`` connections (not counting
        those draining a body) or requests are open, this one included."""
        busy = sum(not getattr(c, "draining", False) for c in self.connections)
        if self.most is None or (busy <= self.most and len(self.tasks) <= self.most):
            await self._app(scope, receive, send)
            return
        log.warning("answering 503: over %d connections or requests", self.most)
        body = error_body(
            503,
            f"the server is at its limit of {self.most} concurrent connections "
            "(adaptr serve --max-connections); retry later",
        )
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _still_draining(self) -> bool:
        """Whether the body being dropped has not all come (and no next request began)."""
        return self.cycle is self._drained and self.conn.their_state is h11.SEND_BODY

    def _stop_draining(self) -> None:
        self._drained = None
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None

    def _late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %g s", self.header_timeout_s)  # fmt: skip
            self.transport.close()

    def _drained_late(self) -> None:
        still = self._still_draining()
        self._stop_draining()
        if still and not self.transport.is_closing():
            log.info("closing a connection whose unread request body took over %g s", self.drain_s)  # fmt: skip
            self.transport.close()
