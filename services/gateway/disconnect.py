"""Waiting for the router while watching the HTTP client.

Starlette notices a client that went away only while it streams a response body. Before that
(a non-streamed request, or a streamed one still waiting for its first token) nothing would,
and the router and its worker would go on generating for nobody. ``unless_disconnected`` races
the work against the client's ``http.disconnect`` and cancels the work if the client leaves
first; the cancel closes the router calls, and the worker frees the request's pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request

from services.gateway.errors import APIError

T = TypeVar("T")

CLIENT_CLOSED = 499  # nginx's status for it; nobody reads the answer, but logs show it


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    await asyncio.gather(task, return_exceptions=True)  # let the cancel reach the router
    raise APIError(CLIENT_CLOSED, "the client closed the connection", code="client_closed_request")


async def _disconnect(request: Request) -> None:
    # the body is read by now, so the server's next message can only be the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass
