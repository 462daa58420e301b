"""The attempt loop (pdmesh/routing/attempts.py), the request type (request.py) and the PD pair
choice (pd_pair.py) on their own, and the disaggregated start running that loop in the router
(services/router/generate.py) against fake worker clients; no processes, no network."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import pytest

from pdmesh.routing import (
    AttemptFailed,
    Attempts,
    CircuitBreakers,
    Failure,
    RetryConfig,
    RoundRobin,
    RouteRequest,
    Stopped,
    choose_pair,
    disaggregates,
)
from pdmesh.routing.attempts import within_migration_limit
from pdmesh.v1 import common_pb2, worker_pb2
from services.router import disagg
from services.router.convert import route_request
from services.router.generate import Generation
from services.router.upstream import OutgoingCalls
from services.router.worker_client import WORKER_SERVICE
from services.router.workers import WorkerSet

FAST = RetryConfig(initial_backoff_ms=1, max_backoff_ms=2)


@dataclass(frozen=True)
class W:
    id: str


@dataclass
class Loop:
    """An ``Attempts`` whose side effects are recorded."""

    retry: RetryConfig = FAST
    retries: int = 0
    unreachable: list[tuple[str, str]] = field(default_factory=list)
    attempts: Attempts = field(init=False)

    def __post_init__(self) -> None:
        def on_retry() -> None:
            self.retries += 1

        self.attempts = Attempts(
            self.retry,
            CircuitBreakers(),
            on_retry=on_retry,
            on_unreachable=lambda w, why: self.unreachable.append((w.id, why)),
        )


def failing(worker: W, code: grpc.StatusCode, unreachable: bool = False) -> AttemptFailed[W]:
    error = RuntimeError(f"{worker.id}: {code.name}")
    return AttemptFailed(Failure(worker, code, "boom", unreachable), error)


def run_loop(loop: Loop, outcomes: dict[str, grpc.StatusCode | None], timeout: float = 5) -> Any:
    """Try the workers in order, each once; None in ``outcomes``: that worker starts it."""
    seen: list[tuple[str, ...]] = []

    async def main() -> Any:
        async def once(tried: tuple[W, ...]) -> str | None:
            seen.append(tuple(w.id for w in tried))
            left = [name for name in outcomes if W(name) not in tried]
            if not left:
                return None
            code = outcomes[left[0]]
            if code is None:
                return left[0]
            raise failing(W(left[0]), code, unreachable=code == grpc.StatusCode.UNAVAILABLE)

        deadline = asyncio.get_running_loop().time() + timeout
        return await loop.attempts.run(once, deadline)

    result = asyncio.run(main())
    return result, seen


def test_a_retryable_failure_is_charged_backed_off_and_tried_elsewhere() -> None:
    loop = Loop()
    result, seen = run_loop(loop, {"a": grpc.StatusCode.UNAVAILABLE, "b": None})
    assert result == "b"
    assert seen == [(), ("a",)]  # the failed worker is excluded from the next try
    assert loop.retries == 1
    assert loop.unreachable == [("a", "boom")]
    assert loop.attempts.breakers.get("a").consecutive_failures == 1


def test_a_client_error_is_neither_retried_nor_charged() -> None:
    loop = Loop()
    result, seen = run_loop(loop, {"a": grpc.StatusCode.INVALID_ARGUMENT, "b": None})
    assert isinstance(result, Stopped) and result.refused
    assert result.tried == (W("a"),) and result.last is not None
    assert str(result.last.error) == "a: INVALID_ARGUMENT"
    assert seen == [()] and loop.retries == 0
    assert loop.attempts.breakers.get("a").consecutive_failures == 0


def test_back_pressure_is_retried_but_not_charged() -> None:
    loop = Loop()
    result, _ = run_loop(loop, {"a": grpc.StatusCode.RESOURCE_EXHAUSTED, "b": None})
    assert result == "b"
    assert loop.attempts.breakers.get("a").consecutive_failures == 0
    assert loop.unreachable == []


def test_attempts_end_at_max_attempts() -> None:
    loop = Loop(retry=RetryConfig(max_retries=1, initial_backoff_ms=1, max_backoff_ms=2))
    outcomes = dict.fromkeys("abc", grpc.StatusCode.UNAVAILABLE)
    result, seen = run_loop(loop, {**outcomes, "d": None})
    assert isinstance(result, Stopped) and result.refused
    assert result.tried == (W("a"), W("b"))
    assert len(seen) == 2 and loop.retries == 1


def test_no_candidate_left_stops_without_refusal() -> None:
    loop = Loop()
    result, _ = run_loop(loop, {"a": grpc.StatusCode.UNAVAILABLE})
    assert isinstance(result, Stopped) and not result.refused
    assert result.tried == (W("a"),) and result.last is not None
    nothing, _ = run_loop(Loop(), {})
    assert nothing == Stopped((), None, refused=False)


def test_an_upstream_deadline_is_retried_the_clients_is_not() -> None:
    result, _ = run_loop(Loop(), {"a": grpc.StatusCode.DEADLINE_EXCEEDED, "b": None})
    assert result == "b"
    expired, _ = run_loop(Loop(), {"a": grpc.StatusCode.DEADLINE_EXCEEDED, "b": None}, timeout=0)
    assert isinstance(expired, Stopped) and expired.refused


def test_a_broken_stream_migrates_on_a_worker_fault_only() -> None:
    async def main() -> None:
        loop = Loop()
        deadline = asyncio.get_running_loop().time() + 5
        a = W("a")
        dead = Failure(a, grpc.StatusCode.UNAVAILABLE, "Socket closed", unreachable=True)
        assert loop.attempts.stream_broke(dead, deadline)
        assert loop.unreachable == [("a", "Socket closed")]
        internal = Failure(a, grpc.StatusCode.INTERNAL, "RST_STREAM")
        assert loop.attempts.stream_broke(internal, deadline)
        assert loop.attempts.breakers.get("a").consecutive_failures == 2
        bad = Failure(a, grpc.StatusCode.INVALID_ARGUMENT, "top_p", unreachable=False)
        assert not loop.attempts.stream_broke(bad, deadline)
        assert loop.attempts.breakers.get("a").consecutive_failures == 2  # not the worker's
        # past the client's deadline nobody waits for the rest
        late = Failure(W("b"), grpc.StatusCode.DEADLINE_EXCEEDED, "late")
        assert not loop.attempts.stream_broke(late, asyncio.get_running_loop().time() - 1)
        assert loop.attempts.stream_broke(late, deadline)  # the worker's own deadline: moves

    asyncio.run(main())
    assert within_migration_limit(1, 1) and not within_migration_limit(2, 1)
    assert not within_migration_limit(1, 0)


def test_available_skips_open_circuits_unless_all_are_open() -> None:
    loop = Loop()
    breakers = loop.attempts.breakers
    for _ in range(breakers.get("a").config.failure_threshold):
        breakers.record_failure("a")
    assert loop.attempts.available([W("a"), W("b")]) == [W("b")]
    assert loop.attempts.available([W("a")]) == [W("a")]


def test_a_resumed_request_lowers_its_budgets() -> None:
    request = RouteRequest("r", [1, 2], max_new_tokens=10, min_new_tokens=5)
    moved = request.resumed([3, 4, 5])
    assert list(moved.prompt) == [1, 2, 3, 4, 5]
    assert (moved.max_new_tokens, moved.min_new_tokens) == (7, 2)
    assert moved.resumed_output_tokens == 3
    assert moved.view.token_ids == moved.prompt and moved.view.request_id == "r"
    unset = RouteRequest("r", [1], min_new_tokens=10).resumed([3] * 8)
    assert (unset.max_new_tokens, unset.min_new_tokens) == (None, 2)
    capped = RouteRequest("r", [1], max_new_tokens=4, min_new_tokens=4).resumed([3] * 3)
    assert (capped.max_new_tokens, capped.min_new_tokens) == (1, 1)
    assert request.attempt_id().startswith("r.") and request.attempt_id() != request.attempt_id()


def test_the_edge_converts_the_request_both_ways() -> None:
    params = common_pb2.SamplingParams(max_new_tokens=10, seed=7)
    route = route_request("r", [1, 2], params, 9.0)
    assert (route.max_new_tokens, route.min_new_tokens, route.deadline) == (10, None, 9.0)
    from services.router.convert import worker_request

    moved = worker_request(route.resumed([5]), params, "r.1")
    assert (moved.request_id, list(moved.token_ids), moved.resumed_output_tokens) == (
        "r.1",
        [1, 2, 5],
        1,
    )
    assert moved.sampling_params.max_new_tokens == 9 and moved.sampling_params.seed == 7
    assert not moved.sampling_params.HasField("min_new_tokens")
    assert params.max_new_tokens == 10  # the client's params are copied, never changed


def test_disaggregation_needs_tokens_wanted_a_long_prompt_and_decodes() -> None:
    long = RouteRequest("r", [1] * 8)
    assert disaggregates(long, 8, has_decodes=True)
    assert not disaggregates(long, 9, has_decodes=True)
    assert not disaggregates(long, 0, has_decodes=False)
    assert not disaggregates(RouteRequest("r", [1] * 8, max_new_tokens=0), 0, True)


def test_the_pair_picks_the_prefill_first_and_needs_both_sides() -> None:
    picked: list[str] = []

    def pick(side: str) -> Any:
        def choose(candidates: Any) -> str:
            picked.append(side)
            return str(candidates[-1])

        return choose

    assert choose_pair(["p1", "p2"], lambda: ["d1"], pick("p"), pick("d")) == ("p2", "d1")
    assert picked == ["p", "d"]
    assert choose_pair([], lambda: ["d1"], pick("p"), pick("d")) is None
    assert choose_pair(["p1"], lambda: [], pick("p"), pick("d")) is None
    assert picked == ["p", "d", "p"]  # the prefill policy saw that one too


def test_the_routing_library_imports_no_wire_type() -> None:
    code = (
        "import sys, pdmesh.routing, pdmesh.routing.attempts, pdmesh.routing.request, "
        "pdmesh.routing.pd_pair, pdmesh.routing.admission\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('pdmesh.v1', 'pdmesh.sglang')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# -- the disaggregated start, through the same loop, on fake worker clients ------------------


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details="boom")


class FakeCall:
    """One request's call: its messages, or an error, then EOF."""

    def __init__(
        self, outcome: list[worker_pb2.GenerateResponse] | grpc.StatusCode, delay: float = 0
    ) -> None:
        self._outcome = outcome
        self._delay = delay
        self.cancelled = False

    async def read(self) -> Any:
        await asyncio.sleep(self._delay)
        if isinstance(self._outcome, grpc.StatusCode):
            raise rpc_error(self._outcome)
        return self._outcome.pop(0) if self._outcome else grpc.aio.EOF

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def __aiter__(self) -> AsyncIterator[worker_pb2.GenerateResponse]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[worker_pb2.GenerateResponse]:
        while (reply := await self.read()) is not grpc.aio.EOF:
            yield reply


class FakeClient:
    """A ``WorkerClient`` whose every call ends as ``outcome`` says."""

    kind = "fake"
    health_service = WORKER_SERVICE

    def __init__(self, outcome: grpc.StatusCode | None) -> None:
        self.outcome = outcome
        self.requests: list[worker_pb2.GenerateRequest] = []

    def _call(self, request: worker_pb2.GenerateRequest, delay: float = 0) -> FakeCall:
        self.requests.append(request)
        if self.outcome is not None:
            return FakeCall(self.outcome, delay)
        return FakeCall([worker_pb2.GenerateResponse(token_ids=[7])], delay)

    def generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> FakeCall:
        # a decode's first token comes after its prefill ended (it needs the prefill's KV)
        return self._call(request, delay=0.05)

    def own_call(self, request: worker_pb2.GenerateRequest, timeout: float) -> FakeCall:
        return self._call(request)

    async def model_info(self, timeout: float) -> worker_pb2.GetModelInfoResponse:
        return worker_pb2.GetModelInfoResponse()

    async def close(self) -> None:
        return None


def start_disaggregated(
    outcomes: dict[tuple[str, str], grpc.StatusCode | None],
) -> tuple[disagg.Started | None | Exception, Generation, dict[str, FakeClient]]:
    async def main() -> tuple[disagg.Started | None | Exception, Generation, dict[str, Any]]:
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        clients: dict[str, FakeClient] = {}
        for i, ((name, role), outcome) in enumerate(outcomes.items()):
            w = workers.add(f"127.0.0.1:{i + 1}", role=role, id=name)
            w.healthy = True
            w.bootstrap_address = "127.0.0.1:8998" if role == "prefill" else ""
            client = clients[name] = FakeClient(outcome)
            w.client = client  # the interface is all the router uses
        gen = Generation(workers, RoundRobin(), None, retry=FAST)  # type: ignore[arg-type]
        params = common_pb2.SamplingParams(max_new_tokens=4)
        deadline = asyncio.get_running_loop().time() + 5
        route = route_request("r", [1, 2, 3], params, deadline)
        result: disagg.Started | None | Exception
        try:
            result = await gen._start_disaggregated(route, params, OutgoingCalls(), route.view)
            if result is not None:
                await result.prefill_done
        except Exception as e:
            result = e
        finally:
            await workers.close()
        return result, gen, clients

    return asyncio.run(main())


def test_a_failed_prefill_is_charged_and_the_pair_picked_again_without_it() -> None:
    started, gen, clients = start_disaggregated(
        {
            ("p1", "prefill"): grpc.StatusCode.UNAVAILABLE,
            ("p2", "prefill"): None,
            ("d1", "decode"): None,
        }
    )
    assert isinstance(started, disagg.Started) and started.decode.id == "d1"
    assert list(started.first.token_ids) == [7]
    assert gen.breakers.get("p1").consecutive_failures == 1
    assert not gen.workers.all()[0].healthy  # unreachable: marked at once
    assert gen.metrics.retries._value.get() == 1  # one backoff
    # each attempt is its own room, under its own id; both halves of one attempt share them
    (p1,), (p2,) = clients["p1"].requests, clients["p2"].requests
    d_first, d_second = clients["d1"].requests
    assert p1.disagg.bootstrap_room != p2.disagg.bootstrap_room
    assert (d_second.request_id, d_second.disagg.bootstrap_room) == (
        p2.request_id,
        p2.disagg.bootstrap_room,
    )
    assert d_first.request_id == p1.request_id != p2.request_id
    assert p2.request_id.startswith("r.")


def test_a_decodes_client_error_is_passed_on_without_retry() -> None:
    failed, gen, clients = start_disaggregated(
        {("p1", "prefill"): None, ("d1", "decode"): grpc.StatusCode.INVALID_ARGUMENT}
    )
    assert isinstance(failed, disagg.SideFailed) and failed.worker.id == "d1"
    assert failed.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(clients["d1"].requests) == 1
    assert gen.breakers.get("d1").consecutive_failures == 0


def test_no_prefill_runs_the_request_whole() -> None:
    result, _, clients = start_disaggregated({("d1", "decode"): None})
    assert result is None and clients["d1"].requests == []


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED])
def test_when_every_prefill_failed_the_request_runs_whole(code: grpc.StatusCode) -> None:
    # the pair is not found again (the one prefill was tried): no refusal, so decode-only
    result, gen, _ = start_disaggregated({("p1", "prefill"): code, ("d1", "decode"): None})
    assert result is None
    assert gen.breakers.get("p1").consecutive_failures == 1
