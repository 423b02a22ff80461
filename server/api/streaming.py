"""Server-sent events: the wire format, merging several requests' outputs, and a response that
aborts the work as soon as the client goes away."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence

import anyio
from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.api.engine_client import RequestStream
from server.api.errors import APIError, error_body
from server.engine.outputs import RequestOutput

SSE_DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


def sse_error(exc: Exception) -> str:
    """An error after the 200 status went out can only be reported in-band, as a last event."""
    if isinstance(exc, APIError):
        return sse(error_body(exc.status, exc.message, exc.param))
    return sse(error_body(500, f"{type(exc).__name__}: {exc}"))


async def merge(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) pairs from several streams, in arrival order."""
    if len(streams) == 1:  # the common case needs no tasks
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    end = object()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((index, out))
        except Exception as exc:  # hand errors to the consumer, in order with the outputs
            await queue.put((index, exc))
        finally:
            await queue.put((index, end))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is end:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class EventStreamResponse(StreamingResponse):
    """An SSE response that, whatever way it ends, closes its event generator and calls `on_close`.

    Starlette's StreamingResponse leaves the generator to the garbage collector when the client
    disconnects; here a disconnect cancels the generator at once, so the engine request is
    aborted and its KV blocks are freed immediately. `on_close` runs even if streaming never
    started, which is what releases requests that were admitted but never iterated.
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[str, None], on_close: Callable[[], Awaitable[None]]):
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:

                async def stream_then_stop() -> None:
                    try:
                        await self.stream_response(send)
                    except OSError:  # the socket went away mid-write: same as a disconnect
                        pass
                    group.cancel_scope.cancel()

                group.start_soon(stream_then_stop)
                await self.listen_for_disconnect(receive)
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):  # clean up even while being cancelled
                await self._events.aclose()
                await self._on_close()
