"""Abort a non-streaming request when its client disconnects.

Starlette does not cancel a handler whose client has gone; without this a client that times
out would keep its request generating (and holding KV blocks) until the end.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from server.api.errors import APIError

T = TypeVar("T")

CLIENT_CLOSED = 499  # the nginx convention; nobody reads the answer anyway


async def run_unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it and raise APIError(499)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            # The client left (or we are being cancelled): cancelling closes the request streams,
            # which aborts the engine requests and frees their blocks.
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task not in done:
        raise APIError(CLIENT_CLOSED, "client disconnected")
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    # The body has been read by now, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
