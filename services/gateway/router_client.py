"""The gateway's side of the router's gRPC API: streamed ``Generate`` calls with a deadline,
spread round-robin over one or more routers, plus health and model-name look-ups.

Closing a ``generate`` stream early (the HTTP client went away, or another choice failed)
cancels the gRPC call; the router passes the cancel on to the worker, which frees the pages.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import AsyncGenerator, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)
LOOKUP_TIMEOUT_S = 2.0  # health checks and ListWorkers: an answer or a quick "no"


class RouterClient:
    def __init__(self, addresses: Sequence[str], timeout: float) -> None:
        if not addresses:
            raise ValueError("at least one router address is needed")
        self.addresses = tuple(addresses)
        self.timeout = timeout
        self._channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTIONS) for a in addresses]
        self._stubs = [router_pb2_grpc.RouterServiceStub(c) for c in self._channels]
        self._next = itertools.cycle(range(len(addresses)))

    async def generate(
        self, request: router_pb2.RouterGenerateRequest
    ) -> AsyncGenerator[router_pb2.RouterGenerateResponse, None]:
        """The router's messages for ``request``. A router that is UNAVAILABLE before it sent
        anything is skipped for the next one; any other failure raises ``AioRpcError``."""
        first = next(self._next)
        for attempt in range(len(self._stubs)):
            index = (first + attempt) % len(self._stubs)
            call = self._stubs[index].Generate(request, timeout=self.timeout)
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as e:
                last_try = attempt == len(self._stubs) - 1
                if received or last_try or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("router %s unavailable: %s", self.addresses[index], e.details())
            finally:
                # a no-op once the call ended; otherwise the consumer left early and the
                # router (and its worker) must stop working for nobody
                call.cancel()

    async def healthy(self) -> bool:
        """Whether any router answers its health check with SERVING."""
        for channel in self._channels:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=LOOKUP_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        return False

    async def model_names(self) -> list[str]:
        """The distinct model names the routers' workers report (empty if none is known)."""
        names: list[str] = []
        for stub in self._stubs:
            try:
                reply = await stub.ListWorkers(
                    router_pb2.ListWorkersRequest(), timeout=LOOKUP_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                continue
            for worker in reply.workers:
                if worker.model_name and worker.model_name not in names:
                    names.append(worker.model_name)
        return names

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()
