"""The SSE bytes of streamed answers: content chunks from ``ChunkTemplates`` are byte for byte
``sse.event`` of the chunk ``openai_format`` builds, whole streams encoded either way are equal,
and an ``Inbox`` merges what a slow consumer did not take yet."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest

from pdmesh.v1 import common_pb2, router_pb2
from services.gateway import openai_format, sse, streams
from services.gateway.chunk_templates import ChunkTemplates
from services.gateway.generation import Piece, TokenLogprob, Usage
from services.gateway.inbox import Inbox
from services.gateway.openai_format import ResponseMeta
from services.gateway.token_text import TokenTexts

META = ResponseMeta("chatcmpl-abc-123", "smollm2-135m-instruct", 1_700_000_000)
TEXTS = ["", "Hi", ' "quoted" \\ back', "line\nbreak\ttab", "你好 👋", "\u2028\x01", "é" * 300]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("index", [0, 3])
def test_templates_spell_chunks_exactly_as_sse_event(include_usage: bool, index: int) -> None:
    def chat(i: int, text: str) -> dict[str, object]:
        return openai_format.chat_chunk(META, i, {"content": text}, include_usage=include_usage)

    def completion(i: int, text: str) -> dict[str, object]:
        return openai_format.completion_chunk(META, i, text, include_usage=include_usage)

    for build in (chat, completion):
        templates = ChunkTemplates(build)
        for text in TEXTS:
            assert templates.event(index, text) == sse.event(build(index, text))


def pieces(items: list[Piece]) -> AsyncGenerator[Piece, None]:
    async def gen() -> AsyncGenerator[Piece, None]:
        for item in items:
            yield item

    return gen()


STREAM = [
    Piece(0, "Hel"),
    Piece(1, "Wor"),
    Piece(0, "lo ✓", token_ids=(1, 2)),
    Piece(1, "ld", finish_reason="stop", usage=Usage(5, 2, 1)),
    Piece(0, "", finish_reason="length", usage=Usage(5, 3, 1)),
]


@pytest.mark.parametrize("include_usage", [False, True])
def test_encoded_streams_equal_the_dict_ones(include_usage: bool) -> None:
    shape = streams.StreamShape(2, 2, include_usage, logprobs=False)

    async def body(encoded: bool, kind: str) -> bytes:
        make = streams.chat_events if kind == "chat" else streams.completion_events
        events = make(META, pieces(STREAM), shape, TokenTexts(), encoded=encoded)
        return b"".join([chunk async for chunk in sse.encode(events)])

    for kind in ("chat", "completions"):
        plain, encoded = asyncio.run(body(False, kind)), asyncio.run(body(True, kind))
        assert plain == encoded
        assert plain.endswith(sse.DONE)
        if include_usage:  # prompts counted once per prompt (n=2: one prompt)
            assert b'"completion_tokens":5' in plain and b'"prompt_tokens":5' in plain


def test_logprob_chunks_keep_their_full_shape() -> None:
    lp = (TokenLogprob(7, -0.25, ((7, -0.25),)),)
    shape = streams.StreamShape(1, 1, include_usage=False, logprobs=True)

    async def chunks(encoded: bool) -> list[object]:
        items = [Piece(0, "x", token_ids=(7,), logprobs=lp), Piece(0, "", finish_reason="stop")]
        events = streams.chat_events(META, pieces(items), shape, TokenTexts(), encoded=encoded)
        return [e async for e in events]

    encoded = asyncio.run(chunks(True))
    assert encoded == asyncio.run(chunks(False))  # all dicts: nothing templated
    content = encoded[1]
    assert isinstance(content, dict)
    assert content["choices"][0]["logprobs"]["content"][0]["token"] == "token_id:7"


def entry(text: str, last: bool = False) -> router_pb2.RouterGenerateResponse:
    pb = router_pb2.RouterGenerateResponse(text=text, token_ids=[ord(c) for c in text])
    if last:
        pb.finish_reason = common_pb2.FINISH_REASON_STOP
        pb.matched_stop = "."
        pb.usage.prompt_tokens, pb.usage.completion_tokens = 3, len(text)
    return pb


def test_an_inbox_merges_what_was_not_taken_yet() -> None:
    async def test() -> None:
        inbox = Inbox([router_pb2.RouterGenerateRequest()] * 2)
        first, second = inbox.outputs
        first.add(entry("a"))
        taken = await inbox.__anext__()
        assert (taken.index, taken.text) == (0, "a")
        for text in ("b", "c", "d"):
            first.add(entry(text))
        second.add(entry("x"))
        first.add(entry("e", last=True))
        merged = await inbox.__anext__()
        assert (merged.index, merged.text, merged.token_ids) == (0, "bcde", (98, 99, 100, 101))
        assert (merged.finish_reason, merged.matched_stop) == ("stop", ".")
        assert merged.usage == Usage(3, 1, 0)  # the last entry's
        assert (await inbox.__anext__()).text == "x"
        second.end()  # a Generate call that ended without a last entry
        with pytest.raises(StopAsyncIteration):
            await inbox.__anext__()

    asyncio.run(test())


def test_a_response_the_client_left_closes_its_pieces_at_once() -> None:
    """Starlette cancels the body when the client disconnects, maybe before it started: the
    response closes the pieces itself (the router requests' cancel), not the garbage
    collector some time later."""

    async def test() -> None:
        inbox = Inbox([router_pb2.RouterGenerateRequest()])
        stopped: list[bool] = []
        inbox.outputs[0].cancel = lambda: stopped.append(True)
        shape = streams.StreamShape(1, 1, include_usage=False, logprobs=False)
        events = streams.chat_events(META, inbox, shape, TokenTexts(), encoded=True)
        response = sse.response(events, inbox)

        async def receive() -> dict[str, str]:
            return {"type": "http.disconnect"}  # gone before anything was sent

        async def send(message: object) -> None:
            await asyncio.sleep(0)

        scope = {"type": "http", "asgi": {"spec_version": "2.3"}}
        await response(scope, receive, send)  # type: ignore[arg-type]
        assert stopped == [True]

    asyncio.run(test())
