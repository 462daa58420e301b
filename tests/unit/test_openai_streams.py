"""The gateway's streaming machinery, with no network: merging the choices' streams (and
cancelling them all when one fails or the consumer leaves), the OpenAI chunk sequence, SSE
encoding of mid-stream errors, and SGLang's response shape."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from services.gateway import native_format, sse, streams
from services.gateway.errors import APIError
from services.gateway.generation import ChoiceResult, Piece, Usage
from services.gateway.openai_format import ResponseMeta
from services.gateway.token_text import TokenTexts

META = ResponseMeta("chatcmpl-x", "m", 1)


async def pieces_of(
    items: list[Piece | Exception], closed: list[int], delay: float = 0.0
) -> AsyncGenerator[Piece, None]:
    """Yields ``items`` (raising the exceptions among them); records its close in ``closed``."""
    try:
        for item in items:
            await asyncio.sleep(delay)
            if isinstance(item, Exception):
                raise item
            yield item
    finally:
        closed.append(items[0].index if isinstance(items[0], Piece) else -1)


def last(index: int, text: str, completion: int, prompt: int = 5) -> Piece:
    return Piece(index, text, finish_reason="length", usage=Usage(prompt, completion, 0))


def test_chat_events_sequence() -> None:
    async def run() -> list[dict[str, Any]]:
        closed: list[int] = []
        pieces = pieces_of([Piece(0, "Hi"), last(0, " there", 2)], closed)
        shape = streams.StreamShape(1, 1, include_usage=True, logprobs=False)
        return [e async for e in streams.chat_events(META, pieces, shape, TokenTexts())]

    events = asyncio.run(run())
    deltas = [e["choices"][0]["delta"] if e["choices"] else None for e in events]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "Hi"},
        {"content": " there"},
        {},
        None,
    ]
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None, None, None, "length"]
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["usage"]["completion_tokens"] == 2
    assert events[-1]["usage"]["total_tokens"] == 7


def test_sse_encodes_mid_stream_errors_as_a_last_event() -> None:
    async def events(fail: bool) -> AsyncGenerator[dict[str, Any], None]:
        yield {"n": "你好 👋"}
        if fail:
            raise APIError(504, "too slow", code="deadline_exceeded")

    async def body(fail: bool) -> bytes:
        return b"".join([chunk async for chunk in sse.encode(events(fail))])

    ok = asyncio.run(body(False)).decode()
    assert ok == 'data: {"n":"你好 👋"}\n\ndata: [DONE]\n\n'
    failed = asyncio.run(body(True)).decode().split("\n\n")
    assert json.loads(failed[1].removeprefix("data: "))["error"]["code"] == "deadline_exceeded"
    assert "[DONE]" not in failed[-2:]


def test_peek_raises_before_the_stream_starts() -> None:
    async def run() -> None:
        closed: list[int] = []
        await sse.peek(pieces_of([RuntimeError("rejected")], closed))

    with pytest.raises(RuntimeError, match="rejected"):
        asyncio.run(run())


def test_token_strings_without_a_tokenizer() -> None:
    assert asyncio.run(TokenTexts().lookup([3, 9])) == {3: "token_id:3", 9: "token_id:9"}


def test_native_finish_reasons() -> None:
    stop = ChoiceResult(0, text="a", token_ids=[5, 2], finish_reason="stop")
    assert native_format.finish_reason(stop) == {"type": "stop", "matched": 2}
    stop.matched_stop = "\n"
    assert native_format.finish_reason(stop) == {"type": "stop", "matched": "\n"}
    length = ChoiceResult(0, finish_reason="length", usage=Usage(1, 4, 0))
    assert native_format.finish_reason(length) == {"type": "length", "length": 4}
    assert native_format.finish_reason(ChoiceResult(0)) is None
    body = native_format.generate_result(length, "rid", 0.5, None)
    assert body["meta_info"]["id"] == "rid" and "output_token_logprobs" not in body["meta_info"]
