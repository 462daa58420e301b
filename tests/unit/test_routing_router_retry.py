"""The router's retry/breaker wiring (services/router/generate.py) against fake worker stubs:
no processes, no network."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import grpc
import grpc.aio
import pytest

from pdmesh.routing import (
    CircuitBreakerConfig,
    CircuitBreakers,
    RequestView,
    RetryConfig,
    RoundRobin,
)
from pdmesh.v1 import common_pb2, worker_pb2
from services.router.convert import route_request
from services.router.generate import Generation
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.worker_client import PdmeshClient
from services.router.workers import WorkerSet


class FakeCall:
    def __init__(self, outcome: worker_pb2.GenerateResponse | grpc.StatusCode) -> None:
        self._outcome = outcome

    async def read(self) -> worker_pb2.GenerateResponse:
        if isinstance(self._outcome, grpc.StatusCode):
            raise grpc.aio.AioRpcError(
                self._outcome, grpc.aio.Metadata(), grpc.aio.Metadata(), details="boom"
            )
        return self._outcome

    def cancel(self) -> bool:
        return True


class FakeStub:
    def __init__(self, outcome: worker_pb2.GenerateResponse | grpc.StatusCode) -> None:
        self.outcome = outcome
        self.calls = 0

    def Generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> FakeCall:  # noqa: N802
        self.calls += 1
        return FakeCall(self.outcome)


FIRST = worker_pb2.GenerateResponse(token_ids=[1])


def run(
    outcomes: dict[str, worker_pb2.GenerateResponse | grpc.StatusCode],
    retry: RetryConfig,
    breakers: CircuitBreakers | None = None,
    check: Callable[[Generation, dict[str, FakeStub]], None] | None = None,
) -> str:
    async def main() -> str:
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        stubs = {}
        for i, (name, outcome) in enumerate(outcomes.items()):
            w = workers.add(f"127.0.0.1:{1 + i}", id=name)
            w.healthy = True
            stubs[name] = stub = cast(Any, FakeStub(outcome))
            # calls go to the fake per-request Generate
            w.client = PdmeshClient(stub, w.label, shared_stream=False)
        gen = Generation(
            workers,
            RoundRobin(),
            cast(Any, None),
            retry=retry,
            breakers=breakers or CircuitBreakers(),
        )
        deadline = asyncio.get_running_loop().time() + 5
        try:
            params = common_pb2.SamplingParams()
            worker, _, reply = await gen._start_on_a_worker(
                route_request("", [1, 2], params, deadline),
                params,
                OutgoingCalls(),
                RequestView([1, 2]),
            )
            assert reply == FIRST
            return worker.id
        finally:
            if check is not None:
                check(gen, stubs)
            await workers.close()

    return asyncio.run(main())


FAST = RetryConfig(initial_backoff_ms=1, max_backoff_ms=2)


def test_unavailable_is_retried_on_another_worker_and_charged() -> None:
    def check(gen: Generation, stubs: dict[str, FakeStub]) -> None:
        assert gen.breakers.get("a").consecutive_failures == 1
        assert not gen.workers.all()[0].healthy

    ok = {"a": grpc.StatusCode.UNAVAILABLE, "b": FIRST}
    assert run(ok, FAST, check=check) == "b"


def test_disabled_retries_fail_at_once() -> None:
    with pytest.raises(UpstreamError, match="unavailable"):
        run({"a": grpc.StatusCode.UNAVAILABLE, "b": FIRST}, RetryConfig(enabled=False))


def test_client_errors_are_neither_retried_nor_charged() -> None:
    def check(gen: Generation, stubs: dict[str, FakeStub]) -> None:
        assert gen.breakers.get("a").consecutive_failures == 0
        assert stubs["b"].calls == 0

    with pytest.raises(UpstreamError) as info:
        run({"a": grpc.StatusCode.INVALID_ARGUMENT, "b": FIRST}, FAST, check=check)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_resource_exhausted_is_retried_but_not_charged() -> None:
    def check(gen: Generation, stubs: dict[str, FakeStub]) -> None:
        assert gen.breakers.get("a").consecutive_failures == 0

    ok = {"a": grpc.StatusCode.RESOURCE_EXHAUSTED, "b": FIRST}
    assert run(ok, FAST, check=check) == "b"


def test_an_open_circuit_takes_its_worker_out() -> None:
    breakers = CircuitBreakers(CircuitBreakerConfig(failure_threshold=1))
    breakers.record_failure("a")

    def check(gen: Generation, stubs: dict[str, FakeStub]) -> None:
        assert stubs["a"].calls == 0

    assert run({"a": FIRST, "b": FIRST}, FAST, breakers, check) == "b"


def test_retries_stop_when_every_worker_was_tried() -> None:
    def check(gen: Generation, stubs: dict[str, FakeStub]) -> None:
        assert (stubs["a"].calls, stubs["b"].calls) == (1, 1)

    with pytest.raises(UpstreamError, match="a .*b .*unavailable"):
        dead = {"a": grpc.StatusCode.UNAVAILABLE, "b": grpc.StatusCode.UNAVAILABLE}
        run(dead, FAST, check=check)
