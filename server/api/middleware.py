"""The front door of the API paths (/v1/*, /generate): API key, then availability, and a clean
503 for requests still running when the SIGTERM drain time runs out.

Pure ASGI rather than BaseHTTPMiddleware, which wraps `receive` and would hide client
disconnects from the routes. /health and /metrics pass untouched: probes and Prometheus
need no key and must see the server while it drains.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.context import ServerContext
from server.api.errors import error_response

logger = logging.getLogger(__name__)


def is_api_path(path: str) -> bool:
    return path == "/generate" or path == "/v1" or path.startswith("/v1/")


class APIGateMiddleware:
    def __init__(self, app: ASGIApp, ctx: ServerContext):
        self.app = app
        self.ctx = ctx
        key = ctx.settings.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_api_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self._call_within_drain(scope, receive, send)

    async def _call_within_drain(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.ctx.draining:
                raise
            # uvicorn cancels what still runs when drain_timeout_s is over. The engine requests are
            # already aborted (cancellation closed their streams); answer instead of a traceback.
            logger.warning("%s cut off: drain timeout reached", scope["path"])
            if not started:
                await error_response(503, "server shut down before the request finished")(scope, receive, send)

    def _refusal(self, scope: Scope):
        if self._expected is not None and not self._authorized(scope):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  headers={"WWW-Authenticate": "Bearer"})
        if self.ctx.draining:
            return error_response(503, "server is shutting down", headers={"Retry-After": "1"})
        if not self.ctx.engine.is_alive:
            return error_response(503, "engine is not running")
        return None

    def _authorized(self, scope: Scope) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return hmac.compare_digest(given, self._expected)
