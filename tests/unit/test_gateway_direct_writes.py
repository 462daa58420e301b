"""Direct writes (``services.gateway.inbox``): while the HTTP task waits on its inbox, a plain
content entry from the router side is written as its SSE chunk at once, through the response's
``send``; the bytes and their order are those the HTTP task would have sent, a send that has to
wait (a full socket) holds back what comes after it (merged, as for a slow reader), and a send
that fails fails the response with its own error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from pdmesh.v1 import common_pb2, router_pb2
from services.gateway import sse, streams
from services.gateway.generation import Piece, Usage
from services.gateway.inbox import Inbox
from services.gateway.openai_format import ResponseMeta
from services.gateway.token_text import TokenTexts

META = ResponseMeta("chatcmpl-direct", "smollm2-135m-instruct", 1_700_000_000)
SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


def entry(text: str, last: bool = False) -> router_pb2.RouterGenerateResponse:
    pb = router_pb2.RouterGenerateResponse(text=text, token_ids=[ord(c) for c in text])
    if last:
        pb.finish_reason = common_pb2.FINISH_REASON_STOP
        pb.usage.prompt_tokens, pb.usage.completion_tokens = 3, len(text)
    return pb


async def parked(inbox: Inbox) -> None:
    """Until the HTTP task waits on ``inbox`` with nothing pending."""
    for _ in range(1000):
        waiter = inbox._waiter
        if waiter is not None and not waiter.done():
            return
        await asyncio.sleep(0)
    raise AssertionError("the response never waited on its inbox")


async def expected(kind: str, items: list[Piece], shape: streams.StreamShape) -> list[bytes]:
    """What the HTTP task alone makes of ``items``: the dict chunks, encoded one by one."""

    async def gen() -> AsyncGenerator[Piece, None]:
        for item in items:
            yield item

    make = streams.chat_events if kind == "chat" else streams.completion_events
    events = make(META, gen(), shape, TokenTexts(), encoded=False)
    return [chunk async for chunk in sse.encode(events)]


class Client:
    """The ASGI side: records each body; ``gate`` set, the next body's send waits for it."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.gate: asyncio.Future[None] | None = None
        self.fail_with: Exception | None = None
        self._gone = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] != "http.response.body":
            return
        if self.fail_with is not None:
            raise self.fail_with
        if self.gate is not None:
            gate, self.gate = self.gate, None
            await gate
        if message["body"]:
            self.bodies.append(message["body"])

    async def receive(self) -> dict[str, str]:
        await self._gone.wait()
        return {"type": "http.disconnect"}


@pytest.mark.parametrize("kind", ["chat", "completions"])
def test_direct_writes_send_what_the_http_task_would_in_order(kind: str) -> None:
    async def test() -> None:
        inbox = Inbox([router_pb2.RouterGenerateRequest()] * 2)
        shape = streams.StreamShape(2, 1, include_usage=True, logprobs=False)
        make = streams.chat_events if kind == "chat" else streams.completion_events
        first, second = inbox.outputs
        first.add(entry("Hi"))  # what peek waited for
        events = make(META, inbox, shape, TokenTexts(), encoded=True)
        client = Client()
        response = asyncio.ensure_future(
            sse.response(events, inbox)(SCOPE, client.receive, client.send)
        )  # type: ignore[arg-type]
        await parked(inbox)
        sent = len(client.bodies)
        first.add(entry(" there"))
        second.add(entry("x"))
        second.add(entry(""))  # held-back text: no chunk either way
        # written at once, from the caller (the router side): the HTTP task did not run
        assert len(client.bodies) == sent + 2
        gate = client.gate = asyncio.get_running_loop().create_future()
        first.add(entry("1"))  # its send has to wait
        first.add(entry("2"))  # queued behind it ...
        first.add(entry("3"))  # ... and merged with this one
        assert len(client.bodies) == sent + 2
        await asyncio.sleep(0)
        assert len(client.bodies) == sent + 2  # the HTTP task waits for that send too
        gate.set_result(None)
        await parked(inbox)
        first.add(entry("!", last=True))
        second.add(entry("y", last=True))
        await asyncio.wait_for(response, 5)
        items = [
            Piece(0, "Hi"),
            Piece(0, " there"),
            Piece(1, "x"),
            Piece(0, "1"),
            Piece(0, "23"),
            Piece(0, "!", finish_reason="stop", usage=Usage(3, 1, 0)),
            Piece(1, "y", finish_reason="stop", usage=Usage(3, 1, 0)),
        ]
        assert client.bodies == await expected(kind, items, shape)

    asyncio.run(test())


def test_a_direct_write_that_fails_fails_the_response_with_its_error() -> None:
    async def test() -> None:
        inbox = Inbox([router_pb2.RouterGenerateRequest()])
        stopped: list[bool] = []
        inbox.outputs[0].cancel = lambda: stopped.append(True)
        shape = streams.StreamShape(1, 1, include_usage=False, logprobs=False)
        inbox.outputs[0].add(entry("Hi"))
        events = streams.chat_events(META, inbox, shape, TokenTexts(), encoded=True)
        client = Client()
        response = asyncio.ensure_future(
            sse.response(events, inbox)(SCOPE, client.receive, client.send)
        )  # type: ignore[arg-type]
        await parked(inbox)
        client.fail_with = RuntimeError("the connection broke")
        inbox.outputs[0].add(entry(" there"))
        with pytest.raises(RuntimeError, match="the connection broke"):
            await asyncio.wait_for(response, 5)
        assert stopped == [True]  # the router request was cancelled

    asyncio.run(test())


def test_logprobs_answers_are_never_written_directly() -> None:
    async def test() -> None:
        inbox = Inbox([router_pb2.RouterGenerateRequest()])
        shape = streams.StreamShape(1, 1, include_usage=False, logprobs=True)
        events = streams.chat_events(META, inbox, shape, TokenTexts(), encoded=True)
        inbox.outputs[0].add(entry("Hi"))
        client = Client()
        response = asyncio.ensure_future(
            sse.response(events, inbox)(SCOPE, client.receive, client.send)
        )  # type: ignore[arg-type]
        await parked(inbox)
        sent = len(client.bodies)
        inbox.outputs[0].add(entry(" there"))
        assert len(client.bodies) == sent  # queued for the HTTP task
        response.cancel()
        with pytest.raises(asyncio.CancelledError):
            await response

    asyncio.run(test())
