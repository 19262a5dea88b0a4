"""uvicorn's h11 protocol with a deadline for request headers.

uvicorn closes an idle keep-alive connection, but a client that sends its request line
and headers a byte at a time (slowloris) holds its connection, and one of the server's
``--max-connections``, for as long as it likes. Here a request's headers must be complete
within :data:`HEADER_TIMEOUT_S` of its first byte (of the connection, for the first
request); past that the connection is closed. The body has its own deadline
(:attr:`~adaptr.serving.openai.app.Limits.body_timeout_s`).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_S = 10.0

log = logging.getLogger(__name__)


class GuardedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose request headers are late."""

    header_timeout_s = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:  # noqa: ANN001
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            if self._header_timer is None:  # the first bytes of the next request
                self._arm()
        else:
            self._disarm()  # its headers are in

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        self._disarm()  # (the keep-alive timeout watches the idle connection now)
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._late)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _late(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection whose request headers took over %g s", self.header_timeout_s)  # fmt: skip
            self.transport.close()
