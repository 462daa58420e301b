"""The router's per-step relay (``relay.Relay`` as the listener of a ``StreamCall``): with an
``emit``, a request's outputs after its first are handled in the worker stream reader's pass
over each step's message and emitted in order, without waking the request's task per token;
errors, stops and a broken stream still end or move the request as the task-driven path did.
Fake worker streams and a fake detokenizer: no processes, no network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import grpc
import grpc.aio
import pytest

from pdmesh.routing import RoundRobin
from pdmesh.tokenizer import StreamDelta
from pdmesh.v1 import common_pb2, router_pb2, worker_pb2
from services.router import worker_stream
from services.router.generate import Generation
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.worker_client import PdmeshClient
from services.router.workers import WorkerSet

STOP_TOKEN = 99  # the fake detokenizer's stop string ends at this token
BAD_TOKEN = 98  # ... and it refuses this one, as the real one refuses ids out of the vocabulary


class FakeBidi:
    """A worker's ``Stream`` call: the router's writes are recorded, ``steps`` are what the
    worker sends (a ``grpc.StatusCode``: the stream breaks with it)."""

    def __init__(self) -> None:
        self.written: list[worker_pb2.WorkerStreamRequest] = []
        self.incoming: asyncio.Queue[worker_pb2.WorkerStreamResponse | grpc.StatusCode] = (
            asyncio.Queue()
        )

    async def write(self, message: worker_pb2.WorkerStreamRequest) -> None:
        self.written.append(message)

    def cancel(self) -> bool:
        self.incoming.put_nowait(grpc.StatusCode.CANCELLED)  # what grpc's reader then raises
        return True

    def __aiter__(self) -> AsyncIterator[worker_pb2.WorkerStreamResponse]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[worker_pb2.WorkerStreamResponse]:
        while True:
            message = await self.incoming.get()
            if isinstance(message, grpc.StatusCode):
                raise grpc.aio.AioRpcError(
                    message, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Stream removed"
                )
            yield message

    def started(self) -> list[str]:
        return [m.generate.request_id for m in self.written if m.WhichOneof("kind") == "generate"]

    def cancelled(self) -> list[str]:
        return [m.cancel for m in self.written if m.WhichOneof("kind") == "cancel"]


class FakeStreamStub:
    def __init__(self) -> None:
        self.call = FakeBidi()

    def Stream(self) -> FakeBidi:  # noqa: N802
        return self.call


class FakeDetokenizer:
    """Text ``<id>`` per token; STOP_TOKEN completes a stop string, BAD_TOKEN is refused."""

    def __init__(self) -> None:
        self.num_tokens = 0

    def push(self, token_ids: Sequence[int], final: bool) -> StreamDelta:
        if BAD_TOKEN in token_ids:
            raise UpstreamError(grpc.StatusCode.INTERNAL, f"id {BAD_TOKEN} is not in the vocab")
        text = ""
        for t in token_ids:
            self.num_tokens += 1
            if t == STOP_TOKEN:
                return StreamDelta(text, True, "STOP", self.num_tokens)
            text += f"<{t}>"
        return StreamDelta(text, num_tokens=self.num_tokens)

    def close(self) -> None:
        return None


class FakeTokenizer:
    async def prompt_ids(
        self, request: router_pb2.RouterGenerateRequest, timeout: float
    ) -> list[int]:
        return list(request.token_ids.ids)

    async def open_detokenizer(self, *args: Any) -> FakeDetokenizer:
        return FakeDetokenizer()


def output(request_id: str, t: int, last: bool = False) -> worker_pb2.GenerateResponse:
    reply = worker_pb2.GenerateResponse(request_id=request_id, token_ids=[t])
    if last:
        reply.finish_reason = common_pb2.FINISH_REASON_LENGTH
        reply.usage.CopyFrom(common_pb2.Usage(prompt_tokens=2, completion_tokens=1))
    return reply


def step(*outputs: worker_pb2.GenerateResponse) -> worker_pb2.WorkerStreamResponse:
    return worker_pb2.WorkerStreamResponse(outputs=outputs)


def request() -> router_pb2.RouterGenerateRequest:
    return router_pb2.RouterGenerateRequest(
        token_ids=router_pb2.TokenIds(ids=[1, 2]),
        sampling_params=common_pb2.SamplingParams(max_new_tokens=8),
    )


class Mesh:
    """Workers "a" and "b" (migration limit 1) on fake shared streams."""

    def __init__(self) -> None:
        self.workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        self.stubs: dict[str, FakeStreamStub] = {}
        for i, name in enumerate(("a", "b")):
            w = self.workers.add(f"127.0.0.1:{i + 1}", id=name)
            w.healthy, w.migration_limit = True, 1
            stub = self.stubs[name] = FakeStreamStub()
            w.client = PdmeshClient(cast(Any, stub), w.label)  # on the fake shared stream
        self.gen = Generation(self.workers, RoundRobin(), cast(Any, FakeTokenizer()))

    async def started(self, name: str, count: int) -> list[str]:
        """The ids of the first ``count`` requests started on worker ``name``."""
        for _ in range(200):
            ids = self.stubs[name].call.started()
            if len(ids) >= count:
                return ids[:count]
            await asyncio.sleep(0.005)
        raise AssertionError(f"{name} got {self.stubs[name].call.started()}")

    def send(self, name: str, message: worker_pb2.WorkerStreamResponse | grpc.StatusCode) -> None:
        self.stubs[name].call.incoming.put_nowait(message)


async def run(
    mesh: Mesh, emitted: list[router_pb2.RouterGenerateResponse]
) -> list[router_pb2.RouterGenerateResponse]:
    """One generation with an emit; returns what it yielded (nothing, with an emit)."""
    yielded = [r async for r in mesh.gen.generate(request(), 5.0, OutgoingCalls(), emitted.append)]
    return yielded


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    reads = [0]
    read = worker_stream.StreamCall.read

    async def counted(self: worker_stream.StreamCall) -> Any:
        reads[0] += 1
        return await read(self)

    monkeypatch.setattr(worker_stream.StreamCall, "read", counted)
    return reads


def test_outputs_after_the_first_are_relayed_per_step_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads = counting_reads(monkeypatch)

    async def main() -> tuple[list[Any], list[Any], list[Any]]:
        mesh = Mesh()
        one: list[router_pb2.RouterGenerateResponse] = []
        two: list[router_pb2.RouterGenerateResponse] = []
        tasks = [asyncio.ensure_future(run(mesh, one)), asyncio.ensure_future(run(mesh, two))]
        # round robin: the first on a, the second on b; a also gets a third
        (a1,) = await mesh.started("a", 1)
        (b1,) = await mesh.started("b", 1)
        mesh.send("a", step(output(a1, 10)))
        mesh.send("b", step(output(b1, 20)))
        await asyncio.sleep(0.01)  # both are streaming now: their listeners are set
        for t in range(11, 15):
            mesh.send("a", step(output(a1, t)))
            mesh.send("b", step(output(b1, t + 10)))
        mesh.send("a", step(output(a1, 15, last=True)))
        mesh.send("b", step(output(b1, 25, last=True)))
        yielded = await asyncio.gather(*tasks)
        await mesh.workers.close()
        return one, two, [r for y in yielded for r in y]

    one, two, yielded = asyncio.run(main())
    assert yielded == []  # with an emit, everything is emitted
    assert [t for r in one for t in r.token_ids] == [10, 11, 12, 13, 14, 15]
    assert "".join(r.text for r in one) == "<10><11><12><13><14><15>"
    assert [t for r in two for t in r.token_ids] == [20, 21, 22, 23, 24, 25]
    assert [r.worker_id for r in two] == ["b"] * 6
    assert one[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert [r.finish_reason for r in one[:-1]] == [common_pb2.FINISH_REASON_UNSPECIFIED] * 5
    assert one[-1].usage.completion_tokens == 1
    # each request's task read its first output and its end, not each of its six tokens
    assert reads[0] <= 2 * 3


def test_outputs_queued_before_the_listener_are_relayed_in_order() -> None:
    async def main() -> list[router_pb2.RouterGenerateResponse]:
        mesh = Mesh()
        out: list[router_pb2.RouterGenerateResponse] = []
        task = asyncio.ensure_future(run(mesh, out))
        (a1,) = await mesh.started("a", 1)
        # the first three steps in one go: the second and third queue before the task ran
        mesh.send("a", step(output(a1, 1)))
        mesh.send("a", step(output(a1, 2)))
        mesh.send("a", step(output(a1, 3), output("someone-else", 7)))
        mesh.send("a", step(output(a1, 4, last=True)))
        await task
        await mesh.workers.close()
        return out

    out = asyncio.run(main())
    assert [t for r in out for t in r.token_ids] == [1, 2, 3, 4]
    assert out[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_a_stop_string_in_the_relay_cancels_the_worker_request() -> None:
    async def main() -> tuple[list[router_pb2.RouterGenerateResponse], list[str], str]:
        mesh = Mesh()
        out: list[router_pb2.RouterGenerateResponse] = []
        task = asyncio.ensure_future(run(mesh, out))
        (a1,) = await mesh.started("a", 1)
        mesh.send("a", step(output(a1, 1)))
        await asyncio.sleep(0.01)
        mesh.send("a", step(output(a1, 2)))
        mesh.send("a", step(worker_pb2.GenerateResponse(request_id=a1, token_ids=[3, STOP_TOKEN])))
        mesh.send("a", step(output(a1, 4)))  # after the stop: never passed on
        await task
        await asyncio.sleep(0.01)
        cancelled = mesh.stubs["a"].call.cancelled()
        await mesh.workers.close()
        return out, cancelled, a1

    out, cancelled, a1 = asyncio.run(main())
    assert [t for r in out for t in r.token_ids] == [1, 2, 3, STOP_TOKEN]
    assert out[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert out[-1].matched_stop == "STOP"
    assert out[-1].usage.completion_tokens == 4
    assert cancelled == [a1]  # the worker aborts it and frees its pages


def test_an_error_in_the_relay_fails_the_request_from_its_task() -> None:
    async def main() -> tuple[list[router_pb2.RouterGenerateResponse], BaseException | None]:
        mesh = Mesh()
        out: list[router_pb2.RouterGenerateResponse] = []
        task = asyncio.ensure_future(run(mesh, out))
        (a1,) = await mesh.started("a", 1)
        mesh.send("a", step(output(a1, 1)))
        await asyncio.sleep(0.01)
        mesh.send("a", step(output(a1, BAD_TOKEN)))
        mesh.send("a", step(output(a1, 3)))
        error = None
        try:
            await task
        except UpstreamError as e:
            error = e
        await mesh.workers.close()
        return out, error

    out, error = asyncio.run(main())
    assert isinstance(error, UpstreamError) and "not in the vocab" in error.details
    assert [t for r in out for t in r.token_ids] == [1]


def test_a_stream_that_breaks_mid_relay_migrates_with_what_was_sent() -> None:
    async def main() -> tuple[list[router_pb2.RouterGenerateResponse], list[int]]:
        mesh = Mesh()
        out: list[router_pb2.RouterGenerateResponse] = []
        task = asyncio.ensure_future(run(mesh, out))
        (a1,) = await mesh.started("a", 1)
        mesh.send("a", step(output(a1, 5)))
        await asyncio.sleep(0.01)
        mesh.send("a", step(output(a1, 6)))
        mesh.send("a", grpc.StatusCode.UNAVAILABLE)
        (b1,) = await mesh.started("b", 1)
        moved = next(m.generate for m in mesh.stubs["b"].call.written if m.generate.request_id)
        mesh.send("b", step(output(b1, 7)))
        await asyncio.sleep(0.01)
        mesh.send("b", step(output(b1, 8, last=True)))
        await task
        await mesh.workers.close()
        return out, list(moved.token_ids)

    out, moved_prompt = asyncio.run(main())
    assert [t for r in out for t in r.token_ids] == [5, 6, 7, 8]
    assert [r.worker_id for r in out] == ["a", "a", "b", "b"]
    assert moved_prompt == [1, 2, 5, 6]
    assert out[-1].usage.completion_tokens == 1 + 2  # b's count plus the two a sent
