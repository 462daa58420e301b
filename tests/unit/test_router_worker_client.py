"""The router's worker client interface (services/router/worker_client.py): the kind is picked
once from the address, and each kind's client makes the router's calls — health under its own
service name, model info, a generation — against a real in-process gRPC server that serves
both protocols (as a pdmesh worker does). No fakes of the clients themselves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdmesh.errors import InvalidRequestError
from pdmesh.rpc import keepalive
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.sglang import sglang_scheduler_pb2_grpc
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.router.worker_client import (
    KINDS,
    WORKER_SERVICE,
    PdmeshClient,
    WorkerClient,
    client_kind,
)
from services.router.workers import WorkerSet
from services.sglang_grpc import client as sglang_client
from services.sglang_grpc import server_args as sa


class Worker(worker_pb2_grpc.WorkerServiceServicer):
    async def GetModelInfo(self, request: Any, context: Any) -> worker_pb2.GetModelInfoResponse:  # noqa: N802
        return worker_pb2.GetModelInfoResponse(model_name="pdmesh-model", migration_limit=2)

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        yield worker_pb2.GenerateResponse(token_ids=[len(request.token_ids)])


class Scheduler(sglang_scheduler_pb2_grpc.SglangSchedulerServicer):
    def __init__(self) -> None:
        self.requests: list[sgl.GenerateRequest] = []

    async def GetModelInfo(self, request: Any, context: Any) -> sgl.GetModelInfoResponse:  # noqa: N802
        return sgl.GetModelInfoResponse(served_model_name="sglang-model", max_context_length=64)

    async def GetServerInfo(self, request: Any, context: Any) -> sgl.GetServerInfoResponse:  # noqa: N802
        args = struct_pb2.Struct()
        args.update({sa.DISAGGREGATION_MODE: "null", sa.MIGRATION_LIMIT: 3})
        return sgl.GetServerInfoResponse(server_args=args)

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:  # noqa: N802
        self.requests.append(request)
        yield sgl.GenerateResponse(chunk=sgl.GenerateStreamChunk(token_ids=[5]))
        complete = sgl.GenerateComplete(
            output_ids=[5, 6], finish_reason="length", prompt_tokens=2, completion_tokens=2
        )
        yield sgl.GenerateResponse(complete=complete)


Test = Callable[[str, str, Scheduler, health.HealthServicer], Awaitable[None]]


def serve(test: Test) -> None:
    """Run ``test`` against a server of both protocols on two free ports (the router takes one
    worker per address)."""

    async def main() -> None:
        server = grpc.aio.server()
        scheduler = Scheduler()
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(Worker(), server)
        sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(scheduler, server)
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        ports = [server.add_insecure_port("127.0.0.1:0") for _ in range(2)]
        await server.start()
        try:
            await test(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}", scheduler, checks)
        finally:
            await server.stop(None)

    asyncio.run(main())


SERVING = health_pb2.HealthCheckResponse.SERVING


def test_the_kind_is_picked_once_from_the_address() -> None:
    kind, address = client_kind("10.0.0.5:50053")
    assert (kind, address) == (PdmeshClient, "10.0.0.5:50053")
    kind, address = client_kind("sglang-grpc://10.0.0.5:30000")
    assert (kind, address) == (sglang_client.SglangClient, "10.0.0.5:30000")
    assert set(KINDS) == {"pdmesh", "sglang-grpc"}
    # pdmesh workers are pinged (a hung one fails fast); an SGLang server's policy is its own
    assert PdmeshClient.channel_options == keepalive.CLIENT_OPTIONS
    assert sglang_client.SglangClient.channel_options == ()
    with pytest.raises(InvalidRequestError, match="sglang-grpc://"):
        client_kind("grpc://10.0.0.5:1")


def test_each_kind_answers_health_model_info_and_generation_in_its_protocol() -> None:
    async def test(
        address: str, other: str, scheduler: Scheduler, checks: health.HealthServicer
    ) -> None:
        workers = WorkerSet(rpc_timeout=5.0, drain_timeout=0.0)
        try:
            ours = workers.add(address, id="ours")
            theirs = workers.add(f"sglang-grpc://{other}", id="theirs")
            assert isinstance(ours.client, PdmeshClient)
            assert isinstance(theirs.client, sglang_client.SglangClient)
            clients: list[WorkerClient] = [ours.client, theirs.client]  # one interface
            assert [c.health_service for c in clients] == [
                WORKER_SERVICE,
                sglang_client.SERVICE_NAME,
            ]
            # each asks health under its own service name
            await checks.set(WORKER_SERVICE, SERVING)
            assert await workers.check(ours) and not await workers.check(theirs)
            await checks.set(sglang_client.SERVICE_NAME, SERVING)
            assert await workers.check(theirs)
            assert (ours.model_name, ours.migration_limit) == ("pdmesh-model", 2)
            assert (theirs.model_name, theirs.migration_limit) == ("sglang-model", 3)

            request = worker_pb2.GenerateRequest(request_id="r.1", token_ids=[1, 2])
            replies = [r async for r in theirs.client.own_call(request, 5.0)]
            assert [list(r.token_ids) for r in replies] == [[5], [6]]
            assert replies[-1].usage.completion_tokens == 2
            assert scheduler.requests[0].request_id == "r.1"
            assert list(scheduler.requests[0].tokenized.input_ids) == [1, 2]
            call = ours.client.own_call(request, 5.0)
            assert [list(r.token_ids) async for r in call] == [[2]]
            # the removed worker is found by its address with or without the scheme
            assert workers.remove(address=f"sglang-grpc://{other}")
            assert [w.id for w in workers.all()] == ["ours"]
        finally:
            await workers.close()

    serve(test)
