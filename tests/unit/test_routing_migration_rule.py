"""Which broken streams migrate (``pdmesh.routing.migrates``) and that ``Generation.generate``
follows that rule: a worker fault moves the request whatever code it surfaced as (a killed
worker shows up as UNAVAILABLE, UNKNOWN or INTERNAL depending on timing), a client error or
back-pressure never does. Fake worker stubs and a fake detokenizer: no processes, no network."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, TypeAlias, cast

import grpc
import grpc.aio
import pytest

from pdmesh.routing import RoundRobin, charges_breaker, migrates
from pdmesh.v1 import common_pb2, router_pb2, tokenizer_pb2, worker_pb2
from services.router.generate import Generation
from services.router.relay import WorkerFailed
from services.router.upstream import OutgoingCalls
from services.router.worker_client import PdmeshClient
from services.router.workers import WorkerSet

codes = grpc.StatusCode
WORKER_FAULTS = (
    codes.UNAVAILABLE,
    codes.UNKNOWN,
    codes.INTERNAL,
    codes.ABORTED,
    codes.DATA_LOSS,
    codes.DEADLINE_EXCEEDED,  # the worker's own deadline, while the client still waits
)
NEVER = (
    codes.INVALID_ARGUMENT,
    codes.FAILED_PRECONDITION,
    codes.OUT_OF_RANGE,
    codes.NOT_FOUND,
    codes.RESOURCE_EXHAUSTED,
    codes.CANCELLED,  # our own client's cancel (a worker's own cancel arrives as UNAVAILABLE)
)


def test_worker_faults_migrate_and_request_faults_do_not() -> None:
    for code in WORKER_FAULTS:
        assert migrates(code), code
        # the rule is the breaker's: what the worker is charged for, the request may leave
        assert charges_breaker(code), code
    for code in NEVER:
        assert not migrates(code), code
    assert not migrates(codes.DEADLINE_EXCEEDED, client_deadline_expired=True)
    assert migrates(codes.UNAVAILABLE, client_deadline_expired=True)  # its own limit decides


Outcome: TypeAlias = worker_pb2.GenerateResponse | grpc.StatusCode


class FakeCall:
    """A worker's Generate stream: its messages, then (optionally) a failure."""

    def __init__(self, outcomes: Sequence[Outcome]) -> None:
        self._outcomes = list(outcomes)

    async def read(self) -> worker_pb2.GenerateResponse | grpc.aio.EOFType:
        if not self._outcomes:
            return grpc.aio.EOF
        outcome = self._outcomes.pop(0)
        if isinstance(outcome, grpc.StatusCode):
            raise grpc.aio.AioRpcError(
                outcome, grpc.aio.Metadata(), grpc.aio.Metadata(), details="Stream removed"
            )
        return outcome

    def cancel(self) -> bool:
        return True


class FakeStub:
    def __init__(self, outcomes: Sequence[Outcome]) -> None:
        self.outcomes = outcomes
        self.requests: list[worker_pb2.GenerateRequest] = []

    def Generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> FakeCall:  # noqa: N802
        self.requests.append(request)
        return FakeCall(self.outcomes)


class FakeDetokenizer:
    def __init__(self) -> None:
        self.num_tokens = 0

    def push(self, token_ids: Sequence[int], final: bool) -> tokenizer_pb2.DetokenizeStreamResponse:
        self.num_tokens += len(token_ids)
        return tokenizer_pb2.DetokenizeStreamResponse(
            text="".join(f"<{t}>" for t in token_ids), num_tokens=self.num_tokens
        )

    def close(self) -> None:
        return None


class FakeTokenizer:
    async def prompt_ids(
        self, request: router_pb2.RouterGenerateRequest, timeout: float
    ) -> list[int]:
        return list(request.token_ids.ids)

    async def open_detokenizer(self, *args: Any) -> FakeDetokenizer:
        return FakeDetokenizer()


def token(t: int, last: bool = False) -> worker_pb2.GenerateResponse:
    reply = worker_pb2.GenerateResponse(token_ids=[t])
    if last:
        reply.finish_reason = common_pb2.FINISH_REASON_LENGTH
        reply.usage.CopyFrom(common_pb2.Usage(prompt_tokens=4, completion_tokens=1))
    return reply


Result = tuple[list[router_pb2.RouterGenerateResponse], WorkerFailed | None, FakeStub]


def stream_breaking_with(code: grpc.StatusCode) -> Result:
    """Worker "a" (migration limit 1) sends two tokens and breaks with ``code``; worker "b"
    would send the last one. What the client got, the error it got, and b's stub."""
    stubs = [FakeStub([token(5), token(6), code]), FakeStub([token(7, last=True)])]

    async def main() -> tuple[list[router_pb2.RouterGenerateResponse], WorkerFailed | None]:
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        for i, (name, stub) in enumerate(zip(("a", "b"), stubs)):
            w = workers.add(f"127.0.0.1:{i + 1}", id=name)
            w.healthy, w.migration_limit = True, 1
            # calls go to the fake per-request Generate
            w.client = PdmeshClient(cast(Any, stub), w.label, shared_stream=False)
        gen = Generation(workers, RoundRobin(), cast(Any, FakeTokenizer()))
        request = router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=[1, 2]),
            sampling_params=common_pb2.SamplingParams(max_new_tokens=3),
        )
        out: list[router_pb2.RouterGenerateResponse] = []
        error: WorkerFailed | None = None
        try:
            async for reply in gen.generate(request, 5.0, OutgoingCalls()):
                out.append(reply)
        except WorkerFailed as e:
            error = e
        finally:
            await workers.close()
        return out, error

    out, error = asyncio.run(main())
    return out, error, stubs[1]


@pytest.mark.parametrize("code", [codes.UNAVAILABLE, codes.UNKNOWN, codes.INTERNAL])
def test_a_worker_fault_mid_stream_moves_the_request(code: grpc.StatusCode) -> None:
    out, error, b = stream_breaking_with(code)
    assert error is None
    assert [t for r in out for t in r.token_ids] == [5, 6, 7]
    assert [r.worker_id for r in out] == ["a", "a", "b"]
    assert out[-1].usage.completion_tokens == 3  # b's one token plus the two a sent
    # b got the prompt plus what a sent, with the budget that was left
    (moved,) = b.requests
    assert (list(moved.token_ids), moved.sampling_params.max_new_tokens) == ([1, 2, 5, 6], 1)


@pytest.mark.parametrize("code", [codes.INVALID_ARGUMENT, codes.RESOURCE_EXHAUSTED])
def test_a_client_error_mid_stream_is_passed_on_not_migrated(code: grpc.StatusCode) -> None:
    out, error, b = stream_breaking_with(code)
    assert error is not None and error.code == code
    assert [r.worker_id for r in out] == ["a", "a"]
    assert b.requests == []
