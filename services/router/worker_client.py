"""``WorkerClient``: the calls the router makes on one worker, whatever protocol it speaks, and
the kinds that implement it.

A worker's kind is picked once, from its address, when it is added (``client_kind``): plain
``host:port`` is a pdmesh worker (``PdmeshClient``: ``pdmesh.v1.WorkerService``, every request
on the one shared ``Stream``), ``sglang-grpc://host:port`` one that speaks SGLang's scheduler
protocol (``services.sglang_grpc.client.SglangClient``). Past that point nothing in the router
asks which kind a worker is: routing policies, retries, breakers, migration and PD pairing see
only this interface.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, TypeAlias

import grpc
import grpc.aio

from pdmesh.rpc import keepalive
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.router.worker_stream import StreamCall, WorkerStream
from services.sglang_grpc import client as sglang_client

# a generation on a worker as the router reads it (``read()`` → the next GenerateResponse, then
# ``grpc.aio.EOF``; a failure raises ``grpc.aio.AioRpcError``; ``cancel()`` aborts it there)
GenerationCall: TypeAlias = (
    "StreamCall | sglang_client.SglangCall"
    " | grpc.aio.UnaryStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]"
)

# a request's own streaming call (``WorkerClient.own_call``): also ``async for``-able
OwnCall: TypeAlias = (
    "sglang_client.SglangCall"
    " | grpc.aio.UnaryStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]"
)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


class WorkerView(Protocol):
    """What a client may read off the router's handle of its worker (set once checked)."""

    @property
    def role(self) -> str: ...

    @property
    def bootstrap_address(self) -> str: ...

    @property
    def label(self) -> str: ...


class WorkerClient(Protocol):
    """One worker's calls. Aborting a request is cancelling its call; health is asked of the
    worker's ``grpc.health.v1`` service under ``health_service``."""

    kind: str
    health_service: str  # the service name its grpc.health.v1 answers for

    def generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> GenerationCall:
        """Start ``request`` there; its messages are read off the call returned."""

    def own_call(self, request: worker_pb2.GenerateRequest, timeout: float) -> OwnCall:
        """``request`` as a call of its own, read to its end with ``async for`` (a prefill's
        half, drained in the background), never on a stream shared with other requests."""

    async def model_info(self, timeout: float) -> worker_pb2.GetModelInfoResponse:
        """The worker's model, role, bootstrap port and migration limit."""

    async def close(self) -> None:
        """Stop what the client runs itself (not the channel: the worker set owns it)."""


class ClientKind(Protocol):
    """A ``WorkerClient`` class: how its channel is made and how a client is made on it."""

    @property
    def kind(self) -> str: ...

    @property
    def channel_options(self) -> Sequence[tuple[str, Any]]: ...

    def connect(self, channel: grpc.aio.Channel, worker: WorkerView) -> WorkerClient: ...


class PdmeshClient:
    """A pdmesh worker: every request on the worker's shared ``Stream`` (one message per engine
    step for all of them), or as its own ``Generate`` where the worker has no ``Stream``."""

    kind = "pdmesh"
    health_service = WORKER_SERVICE
    # pings find a hung pdmesh worker within seconds (its calls fail UNAVAILABLE, so they retry
    # or migrate) instead of at each request's deadline
    channel_options: ClassVar[Sequence[tuple[str, Any]]] = keepalive.CLIENT_OPTIONS

    def __init__(
        self, stub: worker_pb2_grpc.WorkerServiceStub, label: str, shared_stream: bool = True
    ) -> None:
        """``shared_stream``: False sends every request as its own Generate call."""
        self.stub = stub
        self.stream = WorkerStream(stub, label) if shared_stream else None

    @classmethod
    def connect(cls, channel: grpc.aio.Channel, worker: WorkerView) -> PdmeshClient:
        return cls(worker_pb2_grpc.WorkerServiceStub(channel), worker.label)

    def generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> GenerationCall:
        if self.stream is not None and not self.stream.unsupported:
            return self.stream.open(request, timeout)
        return self.stub.Generate(request, timeout=timeout)

    def own_call(self, request: worker_pb2.GenerateRequest, timeout: float) -> OwnCall:
        return self.stub.Generate(request, timeout=timeout)

    async def model_info(self, timeout: float) -> worker_pb2.GetModelInfoResponse:
        return await self.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=timeout)

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()


KINDS: dict[str, ClientKind] = {
    PdmeshClient.kind: PdmeshClient,
    sglang_client.SglangClient.kind: sglang_client.SglangClient,
}


def client_kind(address: str) -> tuple[ClientKind, str]:
    """The kind a worker address names, and its ``host:port`` (raises ``InvalidRequestError``
    for an unknown scheme)."""
    kind, host_port = sglang_client.split_address(address)
    return KINDS[kind], host_port
