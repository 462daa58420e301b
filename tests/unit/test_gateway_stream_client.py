"""The gateway's router client over ``RouterService.Stream``, against small in-test routers
(grpc.aio servers on loopback in the test's own event loop, no model): requests demultiplexed by
tag, a slow reader's output merged while another reader is unaffected, cancels sent when the
HTTP side leaves, a request's ``RequestStatus`` mapped like the Generate error it stands for, a
broken stream, failover, the local deadline, a removed router's drain, the fallback to
Generate for a router without Stream, and each request's trace span."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from services.gateway.errors import from_rpc_error
from services.gateway.generation import GenerationError, Piece, collect
from services.gateway.inbox import Inbox
from services.gateway.router_client import RouterClient
from services.gateway.router_errors import rpc_error

SERVICE = "pdmesh.v1.RouterService"


def request(prompt: str, max_new_tokens: int = 0) -> router_pb2.RouterGenerateRequest:
    params = common_pb2.SamplingParams()
    if max_new_tokens:
        params.max_new_tokens = max_new_tokens
    return router_pb2.RouterGenerateRequest(
        request_id=prompt[:8], text=prompt, sampling_params=params
    )


class _Open:
    """One request the fake is generating: it echoes its prompt, one character per step."""

    def __init__(self, req: router_pb2.RouterGenerateRequest) -> None:
        params = req.sampling_params
        limit = params.max_new_tokens if params.HasField("max_new_tokens") else len(req.text)
        self.text = (req.text * (limit // len(req.text) + 1))[:limit]
        self.prompt_tokens = len(req.text)
        self.sent = 0

    def step(self) -> router_pb2.RouterGenerateResponse:
        char = self.text[self.sent]
        self.sent += 1
        entry = router_pb2.RouterGenerateResponse(text=char, token_ids=[ord(char)])
        if self.sent == len(self.text):
            entry.finish_reason = common_pb2.FINISH_REASON_LENGTH
            entry.usage.prompt_tokens = self.prompt_tokens
            entry.usage.completion_tokens = self.sent
        return entry

    @property
    def finished(self) -> bool:
        return self.sent == len(self.text)


class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """A router whose 'engine' steps every ``step_s``: Stream sends one message per step with an
    entry for each open request; Generate one message per step per call."""

    def __init__(self, step_s: float = 0.005, early_headers: bool = True) -> None:
        self.step_s = step_s
        self.early_headers = early_headers  # send headers at once (else with the first output)
        self.streams = 0  # Stream calls opened
        self.generate_calls = 0
        self.started: list[router_pb2.RouterStreamRequest] = []
        self.cancelled: list[int] = []
        self.stream_ended = asyncio.Event()
        self.status: common_pb2.RequestStatus | None = None  # answer every request with it
        self.hang = False  # accept requests, never answer
        self.break_after_steps: int | None = None  # abort each Stream call after N steps

    async def Stream(
        self,
        request_iterator: AsyncIterator[router_pb2.RouterStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.RouterStreamResponse]:
        self.streams += 1
        if self.early_headers:
            await context.send_initial_metadata(())
        open_: dict[int, _Open] = {}
        failed: list[int] = []

        async def read() -> None:
            async for message in request_iterator:
                if message.WhichOneof("kind") == "generate":
                    self.started.append(message)
                    if self.status is not None:
                        failed.append(message.tag)
                    elif not self.hang:
                        open_[message.tag] = _Open(message.generate)
                elif message.cancel:
                    self.cancelled.append(message.tag)
                    open_.pop(message.tag, None)

        reader = asyncio.ensure_future(read())
        steps = 0
        try:
            while True:
                await asyncio.sleep(self.step_s)
                steps += 1
                if self.break_after_steps is not None and steps > self.break_after_steps:
                    await context.abort(grpc.StatusCode.INTERNAL, "RST_STREAM")
                response = router_pb2.RouterStreamResponse()
                for tag in failed:
                    entry = response.outputs.add(tag=tag)
                    entry.status.CopyFrom(self.status)
                failed.clear()
                for tag, state in list(open_.items()):
                    entry = state.step()
                    entry.tag = tag
                    response.outputs.append(entry)
                    if state.finished:
                        del open_[tag]
                if response.outputs:
                    yield response
        finally:
            reader.cancel()
            self.stream_ended.set()

    async def Generate(
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        self.generate_calls += 1
        state = _Open(request)
        while not state.finished:
            await asyncio.sleep(self.step_s)
            yield state.step()


@contextlib.asynccontextmanager
async def serving(fake: FakeRouter, stream: bool = True) -> AsyncIterator[str]:
    """``fake`` on a loopback port; without ``stream`` it serves Generate only, as an older
    router's generated code does (grpc itself answers UNIMPLEMENTED for Stream)."""
    server = grpc.aio.server()
    if stream:
        router_pb2_grpc.add_RouterServiceServicer_to_server(fake, server)
    else:
        handler = grpc.unary_stream_rpc_method_handler(
            fake.Generate,
            request_deserializer=router_pb2.RouterGenerateRequest.FromString,
            response_serializer=router_pb2.RouterGenerateResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Generate": handler}),)
        )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=30))


async def until(condition: Callable[[], bool], limit_s: float = 2.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def pieces_of(inbox: Inbox) -> list[Piece]:
    return [piece async for piece in inbox]


# -- the shared stream -------------------------------------------------------------------------


def test_requests_share_one_stream_and_come_back_by_tag() -> None:
    async def test() -> None:
        fake = FakeRouter(early_headers=False)  # the requests after the first wait for them
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10)
            prompts = ["hello there", "a different prompt", "xyz"]
            inboxes = [client.start([request(p)]) for p in prompts]
            results = await asyncio.gather(*(collect(inbox, 1) for inbox in inboxes))
            for prompt, (result,) in zip(prompts, results, strict=True):
                assert result.text == prompt
                assert result.token_ids == [ord(c) for c in prompt]
                assert result.finish_reason == "length"
                assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (
                    len(prompt),
                    len(prompt),
                )
            # n choices of one HTTP request: one inbox, pieces tagged by choice
            (a, b) = await collect(client.start([request("one"), request("three")]), 2)
            assert (a.text, b.text) == ("one", "three")
            assert fake.streams == 1 and fake.generate_calls == 0
            assert len({m.tag for m in fake.started}) == len(fake.started) == 5
            assert all(m.timeout_secs > 9 for m in fake.started)  # the request timeout
            await client.close()

    run(test)


def test_a_slow_reader_gets_merged_pieces_and_does_not_slow_the_others() -> None:
    async def test() -> None:
        fake = FakeRouter(step_s=0.01)
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10)
            text = "abcdefghijklmnopqrst"  # 20 steps, 0.2 s
            slow_inbox = client.start([request(text)])
            fast_inbox = client.start([request(text.upper())])
            fast_done = asyncio.get_running_loop().create_future()

            async def fast() -> list[Piece]:
                pieces = await pieces_of(fast_inbox)
                fast_done.set_result(time.monotonic())
                return pieces

            async def slow() -> tuple[list[Piece], float]:
                first = await slow_inbox.__anext__()
                await asyncio.sleep(0.5)  # far slower than the tokens come
                resumed = time.monotonic()
                return [first, *await pieces_of(slow_inbox)], resumed

            fast_pieces, (slow_pieces, resumed) = await asyncio.gather(fast(), slow())
            assert "".join(p.text for p in slow_pieces) == text
            assert len(slow_pieces) <= 3, [p.text for p in slow_pieces]  # merged, not queued
            assert slow_pieces[-1].finish_reason == "length"
            assert slow_pieces[-1].usage is not None
            assert slow_pieces[-1].usage.completion_tokens == 20
            assert "".join(p.text for p in fast_pieces) == text.upper()
            assert len(fast_pieces) >= 10  # read as it came
            assert fast_done.result() < resumed  # finished while the slow one slept
            await client.close()

    run(test)


def test_closing_the_inbox_cancels_at_the_router() -> None:
    async def test() -> None:
        fake = FakeRouter()
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10)
            inbox = client.start([request("long", max_new_tokens=100_000)] * 2)
            await inbox.__anext__()
            await inbox.aclose()
            tags = sorted(m.tag for m in fake.started)
            await until(lambda: sorted(fake.cancelled) == tags, limit_s=1.0)
            # a dropped inbox (a response cancelled before its body ran) cancels too
            dropped = client.start([request("dropped", max_new_tokens=100_000)])
            await dropped.__anext__()
            del dropped
            gc.collect()
            await until(lambda: len(fake.cancelled) == 3, limit_s=1.0)
            await client.close()

    run(test)


def test_a_request_status_maps_like_the_generate_error_it_stands_for() -> None:
    async def test() -> None:
        fake = FakeRouter()
        fake.status = common_pb2.RequestStatus(
            code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
            message="queue full (100 waiting)",
            detail=common_pb2.ErrorDetail(code="queue_full"),
        )
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(client.start([request("hi")]), 1)
            got = from_rpc_error(caught.value)
            detail = common_pb2.ErrorDetail(code="queue_full")
            want = from_rpc_error(
                rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full (100 waiting)", detail)
            )
            assert (got.status, got.body()) == (want.status, want.body())
            assert got.status == 429 and got.code == "queue_full"
            fake.status = common_pb2.RequestStatus(
                code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                message="prompt too long",
                detail=common_pb2.ErrorDetail(field="text", reason="too long"),
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(client.start([request("hi")]), 1)
            error = from_rpc_error(caught.value)
            assert (error.status, error.param, error.message) == (400, "text", "prompt too long")
            await client.close()

    run(test)


def test_an_in_band_failure_comes_after_the_text_before_it() -> None:
    async def test() -> None:
        inbox = Inbox([request("x")])
        output = inbox.outputs[0]
        output.add(router_pb2.RouterGenerateResponse(text="ab", token_ids=[1, 2]))
        output.add(router_pb2.RouterGenerateResponse(text="c", token_ids=[3]))
        output.add(
            router_pb2.RouterGenerateResponse(
                finish_reason=common_pb2.FINISH_REASON_ERROR, error="worker died"
            )
        )
        await inbox.peek()
        piece = await inbox.__anext__()
        assert (piece.text, piece.token_ids) == ("abc", (1, 2, 3))
        with pytest.raises(GenerationError, match="worker died"):
            await inbox.__anext__()

    run(test)


# -- failures ----------------------------------------------------------------------------------


def test_a_broken_stream_fails_its_requests_naming_the_router_and_reopens() -> None:
    async def test() -> None:
        fake = FakeRouter()
        fake.break_after_steps = 3
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10)
            inbox = client.start([request("a long prompt that outlives the stream")])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pieces_of(inbox)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert address in str(caught.value.details())
            assert from_rpc_error(caught.value).status == 503
            fake.break_after_steps = None
            (result,) = await collect(client.start([request("next")]), 1)
            assert result.text == "next" and fake.streams == 2
            await client.close()

    run(test)


def test_an_unreachable_router_is_skipped_for_the_next() -> None:
    async def test() -> None:
        fake = FakeRouter()
        dead = f"127.0.0.1:{free_port()}"  # nothing listens there
        async with serving(fake) as live:
            client = RouterClient([dead, live], timeout=10)
            for _ in range(2):  # round-robin starts at each router once
                (result,) = await collect(client.start([request("hi")]), 1)
                assert result.text == "hi"
            await client.close()
            only_dead = RouterClient([dead], timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(only_dead.start([request("hi")]), 1)
            assert from_rpc_error(caught.value).status == 503
            await only_dead.close()

    run(test)


def test_a_hung_router_fails_the_request_at_the_deadline() -> None:
    async def test() -> None:
        fake = FakeRouter()
        fake.hang = True
        async with serving(fake) as address:
            client = RouterClient([address], timeout=0.5)
            started = time.monotonic()
            inbox = client.start([request("hi")])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await inbox.peek()
            assert 0.4 < time.monotonic() - started < 2.0
            error = from_rpc_error(caught.value)
            assert (error.status, error.code) == (504, "deadline_exceeded")
            assert "deadline" in error.message
            await until(lambda: fake.cancelled == [fake.started[0].tag])
            await client.close()

    run(test)


def test_a_removed_router_finishes_its_requests_then_closes_its_stream() -> None:
    async def test() -> None:
        fake = FakeRouter(step_s=0.01)
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10)
            inbox = client.start([request("twenty characters..")])
            await inbox.peek()
            await client.remove(address)  # returns at once; the request runs on
            assert client.addresses == ()
            with pytest.raises(grpc.aio.AioRpcError, match="no router"):
                await collect(client.start([request("new")]), 1)
            (result,) = await collect(inbox, 1)
            assert result.text == "twenty characters.."
            await asyncio.wait_for(fake.stream_ended.wait(), timeout=2)
            await client.close()

    run(test)


def test_a_router_without_stream_gets_generate_calls_after_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test() -> None:
        fake = FakeRouter()
        async with serving(fake, stream=False) as address:
            client = RouterClient([address], timeout=10)
            first = [client.start([request(p)]) for p in ("one", "two")]
            results = [r.text for (r,) in await asyncio.gather(*(collect(i, 1) for i in first))]
            assert results == ["one", "two"]
            (third,) = await collect(client.start([request("three")]), 1)
            assert third.text == "three"
            assert fake.generate_calls == 3
            # and a client told not to use Stream never tries it
            plain = RouterClient([address], timeout=10, stream=False)
            (result,) = await collect(plain.start([request("four")]), 1)
            assert result.text == "four" and fake.generate_calls == 4
            await client.close()
            await plain.close()

    with caplog.at_level(logging.WARNING, logger="services.gateway"):
        run(test)
    warnings = [r for r in caplog.records if "does not implement" in r.getMessage()]
    assert len(warnings) == 1


def test_generate_calls_are_cancelled_when_the_inbox_closes() -> None:
    async def test() -> None:
        fake = FakeRouter()
        cancelled = asyncio.Event()
        generate = fake.Generate

        async def watched(req: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            context.add_done_callback(lambda _: cancelled.set())
            async for message in generate(req, context):
                yield message

        fake.Generate = watched  # type: ignore[method-assign,assignment]
        async with serving(fake) as address:
            client = RouterClient([address], timeout=10, stream=False)
            inbox = client.start([request("long", max_new_tokens=100_000)])
            await inbox.__anext__()
            await inbox.aclose()
            await asyncio.wait_for(cancelled.wait(), timeout=1)
            await client.close()

    run(test)


def test_each_traced_request_gets_a_client_span_the_router_continues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, StatusCode

    from services.gateway import router_stream

    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    monkeypatch.setattr(router_stream, "_tracer", provider.get_tracer("test"))
    trace_id, http_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    parent = {"traceparent": f"00-{trace_id}-{http_span}-01"}

    async def test() -> None:
        inbox = Inbox([request("ok"), request("failed")])
        ok, failed = inbox.outputs
        carriers = [router_stream._client_span(o, parent, "r:1") for o in inbox.outputs]
        assert router_stream._client_span(ok, {}, "r:1") == {}  # tracing off: nothing
        ok.add(router_pb2.RouterGenerateResponse(finish_reason=common_pb2.FINISH_REASON_STOP))
        failed.fail(rpc_error(grpc.StatusCode.UNAVAILABLE, "router gone"))
        spans = memory.get_finished_spans()
        assert [s.name for s in spans] == [router_stream.CLIENT_SPAN] * 2
        for span, carrier in zip(spans, carriers, strict=True):
            assert span.kind == SpanKind.CLIENT
            assert span.parent is not None and f"{span.parent.span_id:016x}" == http_span
            assert f"{span.context.trace_id:032x}" == trace_id
            # the router's span will be this span's child
            assert carrier["traceparent"].split("-")[2] == f"{span.context.span_id:016x}"
        assert spans[0].status.status_code == StatusCode.UNSET
        assert spans[1].status.status_code == StatusCode.ERROR
        assert spans[1].attributes is not None and spans[1].attributes["rpc.grpc.status_code"] == 14

    run(test)
