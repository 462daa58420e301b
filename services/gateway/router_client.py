"""The gateway's side of the router's gRPC API: streamed ``Generate`` calls with a deadline,
spread round-robin over one or more routers, plus health and model-name look-ups and the
worker-admin calls (sent to every router). The set of
routers is live: ``add``/``remove`` follow the Consul catalog under ``--discovery consul``.

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

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import client_interceptors
from pdmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
)
LOOKUP_TIMEOUT_S = 2.0  # health checks and ListWorkers: an answer or a quick "no"
# AddWorker answers after the router's first health check of the new worker (--rpc-timeout,
# 10 s by default, per check call)
ADMIN_TIMEOUT_S = 30.0


class RouterClient:
    def __init__(
        self, addresses: Sequence[str], timeout: float, tls: TLSConfig = PLAINTEXT
    ) -> None:
        """``addresses``: the routers to start with; more (or all, when empty) via ``add``.
        ``tls``: how the channels to them are secured (``--tls-*``)."""
        self.timeout = timeout
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._turn = itertools.count()
        for address in addresses:
            self.add(address)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._channels)

    def add(self, address: str) -> None:
        if address not in self._channels:
            self._channels[address] = self.tls.channel(
                address, options=CHANNEL_OPTIONS, interceptors=client_interceptors()
            )
            log.info("added router %s", address)

    async def remove(self, address: str) -> None:
        """Stop sending to ``address``; its open streams run on for the request timeout."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            log.info("removed router %s", address)
            await channel.close(grace=self.timeout)

    async def generate(
        self, request: router_pb2.RouterGenerateRequest
    ) -> AsyncGenerator[router_pb2.RouterGenerateResponse, None]:
        """The router's messages for ``request``. A router that is UNAVAILABLE before it sent
        anything is skipped for the next one; any other failure raises ``AioRpcError``."""
        routers = list(self._channels.items())  # a snapshot: the set may change meanwhile
        if not routers:
            raise _no_router()
        first = next(self._turn)
        for attempt in range(len(routers)):
            address, channel = routers[(first + attempt) % len(routers)]
            call = router_pb2_grpc.RouterServiceStub(channel).Generate(
                request, timeout=self.timeout
            )
            received = False
            try:
                async for message in call:
                    received = True
                    yield message
                return
            except grpc.aio.AioRpcError as e:
                last_try = attempt == len(routers) - 1
                if received or last_try or e.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("router %s unavailable: %s", address, e.details())
            finally:
                # a no-op once the call ended; otherwise the consumer left early and the
                # router (and its worker) must stop working for nobody
                call.cancel()

    async def healthy(self) -> bool:
        """Whether any router answers its health check with SERVING."""
        for channel in list(self._channels.values()):
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
        for channel in list(self._channels.values()):
            stub = router_pb2_grpc.RouterServiceStub(channel)
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

    async def add_worker(self, address: str, role: router_pb2.WorkerRole) -> router_pb2.Worker:
        """Add the worker on every router; the first router's view of it."""
        request = router_pb2.AddWorkerRequest(address=address, role=role)
        replies = [await stub.AddWorker(request, timeout=ADMIN_TIMEOUT_S) for stub in self._admin()]
        return replies[0].worker

    async def remove_worker(self, address: str) -> bool:
        """Remove the worker from every router; whether any of them had it."""
        request = router_pb2.RemoveWorkerRequest(address=address)
        found = [
            (await stub.RemoveWorker(request, timeout=ADMIN_TIMEOUT_S)).found
            for stub in self._admin()
        ]
        return any(found)

    async def list_workers(self) -> list[router_pb2.Worker]:
        """Every router's workers, each id once (the first router's view of it)."""
        seen: dict[str, router_pb2.Worker] = {}
        for stub in self._admin():
            reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=ADMIN_TIMEOUT_S)
            for worker in reply.workers:
                seen.setdefault(worker.id, worker)
        return list(seen.values())

    def _admin(self) -> list[router_pb2_grpc.RouterServiceStub]:
        if not self._channels:
            raise _no_router()
        return [router_pb2_grpc.RouterServiceStub(c) for c in list(self._channels.values())]

    async def close(self) -> None:
        for channel in list(self._channels.values()):
            await channel.close()
        self._channels.clear()


def _no_router() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        details="no router is known (none registered in Consul yet?)",
    )
