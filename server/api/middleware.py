"""The front door: the API key on every path that needs it, then (on the API paths, /v1/* and
/generate) availability, and an honest end for requests still running when uvicorn cancels them.

With `api_key` set, every path needs `Authorization: Bearer KEY` (the scheme in any case) except
/health, /ping and /version, which probes call without secrets, and /metrics unless `metrics_require_api_key` is set
(Prometheus scrapes without credentials by default, as with vLLM). /docs, /redoc and /openapi.json
need the key: they are the map of an API that a client without the key cannot call anyway.

Pure ASGI rather than BaseHTTPMiddleware, which wraps `receive` and would hide client
disconnects from the routes.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.context import ServerContext
from server.api.endpoints import HEALTH_PATH, METRICS_PATH
from server.api.errors import error_body, error_response

logger = logging.getLogger(__name__)

ALWAYS_OPEN = frozenset({HEALTH_PATH, "/ping", "/version"})  # probes and version checks carry no secrets
SSE_DONE = b"data: [DONE]\n\n"


def is_api_path(path: str) -> bool:
    return path == "/generate" or path == "/v1" or path.startswith("/v1/")


class APIGateMiddleware:
    def __init__(self, app: ASGIApp, ctx: ServerContext):
        self.app = app
        self.ctx = ctx
        key = ctx.settings.api_key
        self._key = key.encode() if key else None
        self._open = ALWAYS_OPEN if ctx.settings.metrics_require_api_key else ALWAYS_OPEN | {METRICS_PATH}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
        elif is_api_path(scope["path"]):
            await self._call_within_drain(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def _refusal(self, scope: Scope):
        if self._key is not None and scope["path"] not in self._open and not self._authorized(scope):
            return error_response(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                  headers={"WWW-Authenticate": "Bearer"})
        if not is_api_path(scope["path"]):
            return None
        if self.ctx.draining:
            return error_response(503, "server is shutting down", headers={"Retry-After": "1"})
        if not self.ctx.engine.is_alive:
            return error_response(503, "engine is not running")
        return None

    def _authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.strip().partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._key)
        return False

    async def _call_within_drain(self, scope: Scope, receive: Receive, send: Send) -> None:
        started: dict[str, bool] = {"response": False, "events": False}

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                started["response"] = True
                started["events"] = any(name == b"content-type" and value.startswith(b"text/event-stream")
                                        for name, value in message.get("headers", []))
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.ctx.draining:
                raise
            # The backstop: uvicorn cancels what still runs a few seconds after drain_timeout_s, when
            # the server's own cut (see launcher.DrainingServer) did not end it. Its engine requests
            # are aborted already (cancellation closed their streams); answer instead of a traceback.
            self.ctx.cut_requests += 1
            logger.warning("%s cancelled: the drain timeout was reached", scope["path"])
            with contextlib.suppress(Exception):
                await self._end_cut_request(scope, receive, send, started)

    async def _end_cut_request(self, scope: Scope, receive: Receive, send: Send, started: dict[str, bool]) -> None:
        message = "server shut down before the request finished (drain_timeout_s ran out)"
        if not started["response"]:
            await error_response(503, message)(scope, receive, send)
        elif started["events"]:
            event = f"data: {json.dumps(error_body(503, message))}\n\n".encode()
            await send({"type": "http.response.body", "body": event + SSE_DONE, "more_body": False})
