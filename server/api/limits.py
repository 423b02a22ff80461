"""Bounds on what one client can make the server hold: body size, body time, header time.

`BodyLimitMiddleware` answers 413 for a declared Content-Length over the limit before reading any
of it, counts the bytes of bodies sent without one, and answers 408 for a body that does not
arrive within `body_timeout_s` in all. `HeaderTimeoutH11Protocol` closes connections whose request
headers are not complete within `header_timeout_s` (uvicorn's keep-alive timer only runs between
requests, and any byte received cancels it, so a client trickling a header would hold its
connection forever). Headers larger than h11's 16 KiB limit are already a 400 from uvicorn.
"""
from __future__ import annotations

import asyncio
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import BodyError, error_response

logger = logging.getLogger(__name__)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await error_response(413, self._too_large(f"{declared} bytes"))(scope, receive, send)
            return
        await self.app(scope, self._bounded(receive), send)

    def _too_large(self, size: str) -> str:
        return (f"request body is {size}, over the limit of {self.max_body_bytes} bytes "
                "(the max_request_body_bytes setting)")

    def _bounded(self, receive: Receive) -> Receive:
        deadline = time.monotonic() + self.body_timeout_s
        received = 0
        body_done = False

        async def bounded_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # later receives wait for the disconnect, for as long as the response takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.0))
            except asyncio.TimeoutError:  # TimeoutError itself from Python 3.11 on
                raise BodyError(408, f"request body not received within {self.body_timeout_s:g}s "
                                     "(the request_body_timeout_s setting)") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyError(413, self._too_large(f"more than {self.max_body_bytes} bytes"))
                body_done = not message.get("more_body", False)
            else:
                body_done = True
            return message

        return bounded_receive


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # h11 refuses a malformed Content-Length before we see it
    return None


_TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                     b"connection: close\r\ncontent-length: %d\r\n\r\n%s")


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers."""

    def __init__(self, *args, header_timeout_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the request line and headers are in
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # a kept-alive connection: the next request's headers get the same bound

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        logger.info("closing a connection from %s: request headers not complete within %gs",
                    self.client, self._header_timeout_s)
        message = f"request headers not received within {self._header_timeout_s:g}s".encode()
        self.transport.write(_TIMEOUT_RESPONSE % (len(message), message))
        self.transport.close()
