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
from starlette.types import Receive, Scope, Send

from services.gateway.errors import APIError, as_api_error
from services.gateway.generation import Piece, PieceStream
from services.gateway.inbox import DirectSendFailed, Inbox

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies like nginx would otherwise hold events back
}


def event(data: Mapping[str, Any]) -> bytes:
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


# a chunk as a dict, or already encoded as its event (``chunk_templates``)
Events = AsyncGenerator[Mapping[str, Any] | bytes, None]


async def encode(events: Events) -> AsyncGenerator[bytes, None]:
    async with contextlib.aclosing(events) as stream:
        try:
            async for data in stream:
                yield data if isinstance(data, bytes) else event(data)
        except Exception as e:
            error = as_api_error(e)
            if error is None:
                log.exception("stream failed")
                error = APIError(500, f"internal error: {type(e).__name__}")
            yield event(error.body())
            return
    yield DONE


def response(events: Events, pieces: PieceStream) -> StreamingResponse:
    """Starlette runs the body while listening for the client's disconnect and cancels it when
    that comes; the response then closes ``events`` and the ``pieces`` they are made of, which
    cancels the router requests at once (not when the garbage collector gets to the suspended
    generators, nor only after the next token, and also when the body had not started)."""
    return _ClosingResponse(encode(events), pieces, media_type="text/event-stream", headers=HEADERS)


class _ClosingResponse(StreamingResponse):
    def __init__(
        self,
        body: AsyncGenerator[bytes, None],
        pieces: PieceStream,
        media_type: str,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(body, media_type=media_type, headers=headers)
        self._body = body
        self._pieces = pieces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()
            await self._pieces.aclose()

    async def stream_response(self, send: Send) -> None:
        """Starlette's, plus the inbox's direct writes (``inbox``'s doc) while the body
        streams: chunks the router side wrote itself come back here only as their error."""
        start = {"type": "http.response.start", "status": self.status_code}
        await send({**start, "headers": self.raw_headers})
        inbox = self._pieces if isinstance(self._pieces, Inbox) else None
        if inbox is not None:
            inbox.write_directly(send)
        try:
            async for chunk in self._body:  # bytes: ``encode`` made them
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except DirectSendFailed as e:
            raise e.error from None
        finally:
            if inbox is not None:
                inbox.stop_writing()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def peek(pieces: PieceStream) -> PieceStream:
    """Wait for the first piece before the response starts, so that a request the router
    rejects (bad input, no worker) still gets its proper HTTP status rather than a 200 with an
    error event; return a stream that yields that piece again, then the rest."""
    try:
        if isinstance(pieces, Inbox):  # it can wait without taking: no wrapper needed
            await pieces.peek()
            return pieces
        first = await pieces.__anext__()
    except StopAsyncIteration:
        return _chain(None, pieces)
    except BaseException:
        await pieces.aclose()
        raise
    return _chain(first, pieces)


async def _chain(first: Piece | None, rest: PieceStream) -> AsyncGenerator[Piece, None]:
    async with contextlib.aclosing(rest) as stream:
        if first is not None:
            yield first
        async for piece in stream:
            yield piece
