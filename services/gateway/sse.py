"""Server-sent events: each event a ``data: <json>`` line, the stream ending ``data: [DONE]``.

A failure after the response started cannot change the HTTP status any more, so it becomes one
last ``data: {"error": {...}}`` event (the OpenAI body; the official client raises it) and the
stream ends there.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from fastapi.responses import StreamingResponse

from services.gateway.errors import APIError, as_api_error
from services.gateway.generation import Piece

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies like nginx would otherwise hold events back
}


def event(data: Mapping[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


async def encode(events: AsyncGenerator[dict[str, Any], None]) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(events) as stream:
        try:
            async for data in stream:
                yield event(data)
        except Exception as e:
            error = as_api_error(e)
            if error is None:
                log.exception("stream failed")
                error = APIError(500, f"internal error: {type(e).__name__}")
            yield event(error.body())
            return
    yield DONE


def response(events: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    """Starlette runs the body while listening for the client's disconnect and cancels it when
    that comes: the cancel reaches the router calls through ``events``."""
    return StreamingResponse(encode(events), media_type="text/event-stream", headers=HEADERS)


async def peek(
    pieces: AsyncGenerator[Piece, None],
) -> AsyncGenerator[Piece, None]:
    """Wait for the first piece before the response starts, so that a request the router
    rejects (bad input, no worker) still gets its proper HTTP status rather than a 200 with an
    error event; return a stream that yields that piece again, then the rest."""
    try:
        first = await pieces.__anext__()
    except StopAsyncIteration:
        return _chain(None, pieces)
    except BaseException:
        await pieces.aclose()
        raise
    return _chain(first, pieces)


async def _chain(
    first: Piece | None, rest: AsyncGenerator[Piece, None]
) -> AsyncGenerator[Piece, None]:
    async with contextlib.aclosing(rest) as stream:
        if first is not None:
            yield first
        async for piece in stream:
            yield piece
