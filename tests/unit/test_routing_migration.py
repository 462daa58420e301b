"""The router's migration pieces (services/router/generate.py, pdmesh/routing/request.py) against fake worker stubs: the
re-issued request, the limit check and the corrected usage; no processes, no network."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest

from pdmesh.routing import RequestView, RoundRobin
from pdmesh.v1 import common_pb2, tokenizer_pb2, worker_pb2
from services.router.convert import route_request
from services.router.generate import Generation
from services.router.relay import WorkerFailed, passed_on
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.worker_client import PdmeshClient
from services.router.workers import WorkerSet

FIRST = worker_pb2.GenerateResponse(token_ids=[9])


class FakeCall:
    async def read(self) -> worker_pb2.GenerateResponse:
        return FIRST

    def cancel(self) -> bool:
        return True


class FakeStub:
    def __init__(self) -> None:
        self.requests: list[worker_pb2.GenerateRequest] = []

    def Generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> FakeCall:  # noqa: N802
        self.requests.append(request)
        return FakeCall()


def migrate(params: common_pb2.SamplingParams, sent: list[int]) -> tuple[str, Any]:
    async def main() -> tuple[str, Any]:
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        stubs = {}
        for i, name in enumerate(("a", "b")):
            w = workers.add(f"127.0.0.1:{1 + i}", id=name)
            w.healthy = True
            stubs[name] = stub = cast(Any, FakeStub())
            # calls go to the fake per-request Generate
            w.client = PdmeshClient(stub, w.label, shared_stream=False)
        gen = Generation(workers, RoundRobin(), cast(Any, None))
        deadline = asyncio.get_running_loop().time() + 5
        request = route_request("r", [1, 2], params, deadline)
        try:
            worker, _, reply = await gen._migrate(
                request,
                params,
                sent,
                OutgoingCalls(),
                RequestView([1, 2]),
                failed=(workers.all()[0],),
            )
            assert reply == FIRST
            return worker.id, stubs[worker.id].requests[0]
        finally:
            await workers.close()

    return asyncio.run(main())


def test_migration_reissues_prompt_and_tokens_elsewhere_with_lower_budgets() -> None:
    params = common_pb2.SamplingParams(seed=7, max_new_tokens=10, min_new_tokens=5)
    worker, sent = migrate(params, [3, 4, 5])
    assert worker == "b"  # never the failed one
    assert list(sent.token_ids) == [1, 2, 3, 4, 5]
    assert sent.request_id.startswith("r.")  # unique per attempt (RouteRequest.attempt_id)
    p = sent.sampling_params
    assert (p.max_new_tokens, p.min_new_tokens, p.seed) == (7, 2, 7)


def test_migration_without_max_tokens_leaves_the_budget_to_the_new_worker() -> None:
    # the new worker's default (--default-max-tokens, else the context's rest) counts the
    # resumed_output_tokens itself (tests/integration/test_default_max_tokens.py)
    _, sent = migrate(common_pb2.SamplingParams(min_new_tokens=10), [3] * 8)
    assert not sent.sampling_params.HasField("max_new_tokens")
    assert sent.sampling_params.min_new_tokens == 2
    assert sent.resumed_output_tokens == 8


def test_migration_limit_is_checked_per_request() -> None:
    async def main() -> None:
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        w = workers.add("127.0.0.1:1", id="a")
        gen = Generation(workers, RoundRobin(), cast(Any, None))
        error = UpstreamError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        with pytest.raises(WorkerFailed, match="migration limit \\(0\\) reached"):
            gen._check_migration(w, error, 1, "r")
        w.migration_limit = 2
        gen._check_migration(w, error, 2, "r")  # allowed
        with pytest.raises(WorkerFailed) as info:
            gen._check_migration(w, error, 3, "r")
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "127.0.0.1:1" in info.value.details
        await workers.close()

    asyncio.run(main())


def test_usage_after_migration_counts_the_clients_prompt_and_every_token() -> None:
    reply = worker_pb2.GenerateResponse(
        token_ids=[5],
        finish_reason=common_pb2.FINISH_REASON_LENGTH,
        usage=common_pb2.Usage(prompt_tokens=12, completion_tokens=4, cached_tokens=11),
    )
    delta = tokenizer_pb2.DetokenizeStreamResponse(text="x")
    out = passed_on(delta, reply, cast(Any, SimpleNamespace(id="b")), 4, num_before=8)
    assert out.worker_id == "b"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (4, 12)
    assert out.usage.cached_tokens == 4
