"""Adding and removing workers under a steady load, with real processes: streaming greedy
requests run back to back from several clients through a round-robin router while workers
join (AddWorker) and leave (RemoveWorker) it. No request fails, every output equals the
model's greedy output, a removed worker's in-flight requests finish on it, and it gets no new
request until it is added again."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import grpc
import grpc.aio
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc
from tests.integration.procs import ServiceProc, start_service, worker_args
from tests.integration.test_pd import start_all
from tests.integration.test_router_migration import tokens_of
from tests.integration.test_router_service import wait_until_idle

pytestmark = pytest.mark.model

PROMPTS = ["The capital of France is", "Water boils at", "Once upon a time"]
MAX_TOKENS = 12  # long enough that a request is still streaming when its worker is removed
CLIENTS = 3  # requests in flight at any time
STEP_S = 60.0  # deadline of each step of the scenario


@dataclass
class Result:
    prompt: int  # index into PROMPTS
    sent_at: float
    done_at: float = 0.0
    worker_ids: list[str] = field(default_factory=list)  # one per message
    tokens: list[int] = field(default_factory=list)
    last: router_pb2.RouterGenerateResponse | None = None
    error: str = ""


def greedy(prompt: str) -> router_pb2.RouterGenerateRequest:
    params = common_pb2.SamplingParams(temperature=0, max_new_tokens=MAX_TOKENS, ignore_eos=True)
    return router_pb2.RouterGenerateRequest(text=prompt, sampling_params=params)


@dataclass
class Load:
    """CLIENTS loops sending one streaming request after another until ``stop``."""

    stub: router_pb2_grpc.RouterServiceStub
    results: list[Result] = field(default_factory=list)
    stop: bool = False
    _turn: itertools.count[int] = field(default_factory=itertools.count)

    async def client(self) -> None:
        while not self.stop:
            i = next(self._turn) % len(PROMPTS)
            result = Result(i, time.monotonic())
            self.results.append(result)
            try:
                async for reply in self.stub.Generate(greedy(PROMPTS[i]), timeout=STEP_S):
                    result.worker_ids.append(reply.worker_id)
                    result.tokens.extend(reply.token_ids)
                    result.last = reply
            except grpc.aio.AioRpcError as e:
                result.error = f"{e.code().name}: {e.details()}"
            result.done_at = time.monotonic()

    def done(self) -> list[Result]:
        return [r for r in self.results if r.done_at]

    def done_at_least(self, n: int) -> bool:
        return len(self.done()) >= n

    def served_by(self) -> set[str]:
        """The workers that finished requests."""
        return {r.worker_ids[-1] for r in self.done() if r.worker_ids}

    def streaming_on(self, worker_id: str) -> list[Result]:
        """Requests streaming from ``worker_id`` right now (first message in, last not)."""
        return [r for r in self.results if not r.done_at and r.worker_ids[-1:] == [worker_id]]


async def until(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + STEP_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {STEP_S}s: {what}")
        await asyncio.sleep(0.01)


@dataclass
class Removal:
    worker_id: str
    at: float  # when RemoveWorker had returned
    caught: list[Result]  # the requests streaming on it when it was removed


@dataclass
class Scenario:
    results: list[Result]
    removals: list[Removal]
    re_added_at: float  # when the first worker's AddWorker was sent
    listed: list[str]  # worker ids at the end


async def scenario(router: str, first: str, second: str, third: str) -> Scenario:
    """Run the load against ``router`` while the worker set changes: starting with ``first``
    alone, add ``second`` (as w2) and ``third`` (w3), remove ``first`` mid-stream, add it back,
    remove w2 mid-stream."""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        load = Load(stub)
        clients = [asyncio.ensure_future(load.client()) for _ in range(CLIENTS)]
        removals: list[Removal] = []
        re_added_at = 0.0
        try:
            await until(partial(load.done_at_least, CLIENTS), "the load runs on one worker")
            for wid, address in (("w2", second), ("w3", third)):
                added = await stub.AddWorker(
                    router_pb2.AddWorkerRequest(address=address, id=wid), timeout=10
                )
                assert added.worker.healthy, added
            await until(lambda: {"w2", "w3"} <= load.served_by(), "the added workers serve")

            for wid, request in (
                (first, router_pb2.RemoveWorkerRequest(address=first)),
                ("w2", router_pb2.RemoveWorkerRequest(id="w2")),
            ):
                await until(partial(load.streaming_on, wid), f"a request streams on {wid}")
                caught = load.streaming_on(wid)
                assert (await stub.RemoveWorker(request, timeout=10)).found
                removals.append(Removal(wid, time.monotonic(), caught))
                n = len(load.done())
                await until(partial(load.done_at_least, n + CLIENTS), "the load goes on")
                if wid == first:  # back, under its address as id again
                    re_added_at = time.monotonic()
                    added = await stub.AddWorker(
                        router_pb2.AddWorkerRequest(address=first), timeout=10
                    )
                    assert added.worker.healthy, added
            listed = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=10)
        finally:
            load.stop = True
            await asyncio.wait(clients, timeout=STEP_S)
        return Scenario(load.results, removals, re_added_at, sorted(w.id for w in listed.workers))


def test_workers_join_and_leave_under_load_without_a_failed_request(
    tmp_path: Path, tokenizer_proc: ServiceProc, worker_proc: ServiceProc
) -> None:
    # the session's worker is the first; two more join
    specs = [("services.decode", worker_args(), f"worker-{i}") for i in (2, 3)]
    started = start_all(specs, tmp_path)
    procs = [worker_proc, *started]
    first, second, third = (p.address for p in procs)
    args = ["--workers", first, "--tokenizer", tokenizer_proc.address, "--grace-period", "2"]
    try:
        with (
            start_service("services.router", args, "router", log_dir=tmp_path) as router,
            grpc.insecure_channel(router.address) as channel,
        ):
            stub = router_pb2_grpc.RouterServiceStub(channel)
            expected = [tokens_of(stub.Generate(greedy(p), timeout=STEP_S)) for p in PROMPTS]
            run = asyncio.run(scenario(router.address, first, second, third))

        failed = [r.error for r in run.results if r.error]
        assert not failed, failed
        for r in run.results:
            assert r.tokens == expected[r.prompt], (PROMPTS[r.prompt], r.worker_ids)
            assert r.last is not None and r.last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert r.last.usage.completion_tokens == MAX_TOKENS
        assert run.listed == sorted([first, "w3"])
        assert {r.worker_ids[-1] for r in run.results} == {first, "w2", "w3"}
        for removal in run.removals:
            # its in-flight requests went on streaming from it to their end ...
            assert removal.caught
            for r in removal.caught:
                assert set(r.worker_ids) == {removal.worker_id} and r.done_at > removal.at
            # ... and it got no new request (until the first one was added back)
            until_back = run.re_added_at if removal.worker_id == first else float("inf")
            for r in run.results:
                if removal.at < r.sent_at < until_back:
                    assert removal.worker_id not in r.worker_ids, r
        print(f"{len(run.results)} requests, {len(run.removals)} removals, none failed")
        for p in procs:  # and no page left behind anywhere
            with grpc.insecure_channel(p.address) as channel:
                wait_until_idle(worker_pb2_grpc.WorkerServiceStub(channel), within=1.0)
    finally:
        for p in started:
            p.stop()
