"""``WorkerSet``: the live set of workers the router routes to, with one channel each.

Each worker has a role: ``aggregated`` and ``decode`` workers take whole requests (a decode
worker prefills locally when a request comes without a prefill), ``prefill`` workers only the
prefill half of disaggregated ones. A worker's own GetModelInfo must agree with the role it was
added with (a mix-up is logged and keeps it unhealthy), and a prefill counts as healthy only
once its bootstrap address is known.

Health is tracked two ways: a background loop asks every worker's ``grpc.health.v1`` service
every ``interval`` seconds (a draining worker answers NOT_SERVING and stops getting new
requests), and a call that fails with UNAVAILABLE marks its worker unhealthy at once. The set
changes only on the event loop, so it needs no locks.

What protocol a worker speaks is decided once, when it is added: its ``client`` (a
``worker_client.WorkerClient``) makes every call on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import InitVar, dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.errors import InvalidRequestError
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import client_interceptors
from pdmesh.v1 import worker_pb2
from services.router.worker_client import (
    ClientKind,
    GenerationCall,
    PdmeshClient,
    WorkerClient,
    client_kind,
)

__all__ = ["GENERATING_ROLES", "ROLES", "GenerationCall", "WorkerHandle", "WorkerSet"]

log = logging.getLogger(__name__)

ROLES = ("aggregated", "prefill", "decode")
GENERATING_ROLES = ("aggregated", "decode")  # roles that take a request without a prefill


@dataclass(eq=False)
class WorkerHandle:
    id: str
    address: str
    role: str
    channel: grpc.aio.Channel = field(repr=False)
    healthy: bool = False  # whether the last health check (or call) found it serving
    model_name: str = ""  # from GetModelInfo, once it answered
    # prefill workers: host:port of their BootstrapService, from GetModelInfo
    bootstrap_address: str = ""
    # how many times a request may move off this worker when its stream breaks (GetModelInfo)
    migration_limit: int = 0
    # the protocol it speaks (``WorkerSet.add`` picks it from the address): its class makes
    # ``client``, through which every call on the worker goes
    protocol: InitVar[ClientKind] = PdmeshClient
    client: WorkerClient = field(init=False, repr=False)

    def __post_init__(self, protocol: ClientKind) -> None:
        self.client = protocol.connect(self.channel, self)

    def generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> GenerationCall:
        """Start ``request`` here (``WorkerClient.generate``)."""
        return self.client.generate(request, timeout)

    @property
    def label(self) -> str:
        """How messages name it, e.g. "prefill worker p1 (10.0.0.5:50054)"."""
        kind = "worker" if self.role == "aggregated" else f"{self.role} worker"
        if self.id == self.address:
            return f"{kind} {self.address}"
        return f"{kind} {self.id} ({self.address})"


class WorkerSet:
    def __init__(
        self, rpc_timeout: float, drain_timeout: float, tls: TLSConfig = PLAINTEXT
    ) -> None:
        """``rpc_timeout``: deadline of health and model-info calls; ``drain_timeout``: how long
        a removed worker's in-flight calls may run before its channel is closed under them;
        ``tls``: how the channels to workers are secured (``--tls-*``)."""
        self._tls = tls
        self._workers: dict[str, WorkerHandle] = {}  # by id, in the order they were added
        self._rpc_timeout = rpc_timeout
        self._drain_timeout = drain_timeout
        self._background: set[asyncio.Task[None]] = set()
        # called with each removed worker: routing state keyed by it (trees, breakers) goes too
        self.on_remove: list[Callable[[WorkerHandle], None]] = []

    def __len__(self) -> int:
        return len(self._workers)

    def all(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    def add(self, address: str, role: str = "aggregated", id: str | None = None) -> WorkerHandle:
        """Register a worker (unhealthy until ``check`` finds it serving); an address
        ``sglang-grpc://host:port`` is a worker that speaks SGLang's scheduler protocol."""
        kind, address = client_kind(address)
        if ":" not in address:
            raise InvalidRequestError("address", f"{address!r} is not host:port")
        if role not in ROLES:
            raise InvalidRequestError("role", f"{role!r}; choose {', '.join(ROLES)}")
        worker_id = id or address
        for w in self._workers.values():
            if w.id == worker_id or w.address == address:
                raise InvalidRequestError(
                    "address" if w.address == address else "id",
                    f"{w.label} is already registered",
                )
        # the kind says how its channel is kept alive (pdmesh workers are pinged, SGLang
        # servers not: see worker_client)
        options = kind.channel_options
        channel = self._tls.channel(address, options, interceptors=client_interceptors())
        worker = WorkerHandle(worker_id, address, role, channel, protocol=kind)
        self._workers[worker_id] = worker
        log.info("added %s", worker.label)
        return worker

    def remove(self, id: str | None = None, address: str | None = None) -> bool:
        """Unregister a worker; requests already on it run on for up to the drain timeout."""
        if address is not None:  # as given to add, with or without its scheme
            address = client_kind(address)[1]
        worker = next(
            (w for w in self._workers.values() if w.id == id or w.address == address), None
        )
        if worker is None:
            return False
        del self._workers[worker.id]
        for callback in self.on_remove:
            callback(worker)
        # closing the channel ends its Stream too, after the requests on it had their time
        self._spawn(worker.channel.close(grace=self._drain_timeout))
        log.info("removed %s", worker.label)
        return True

    def candidates(
        self,
        exclude: tuple[WorkerHandle, ...] = (),
        roles: tuple[str, ...] = GENERATING_ROLES,
    ) -> list[WorkerHandle]:
        """Workers of ``roles`` a new request may go to: the healthy ones; when none is, all of
        them (health may be stale, and failing the call names the worker, which beats a vague
        error)."""
        workers = [w for w in self._workers.values() if w.role in roles and w not in exclude]
        return [w for w in workers if w.healthy] or workers

    def healthy(self, role: str) -> list[WorkerHandle]:
        """The healthy workers of ``role`` (no fallback: a prefill must be known to work)."""
        return [w for w in self._workers.values() if w.role == role and w.healthy]

    def has_role(self, role: str) -> bool:
        return any(w.role == role for w in self._workers.values())

    async def check(self, worker: WorkerHandle) -> bool:
        """Ask ``worker`` whether it is serving; (re)learn its model info whenever it turns
        healthy (a restarted prefill may have a new bootstrap port)."""
        health = health_pb2_grpc.HealthStub(worker.channel)
        request = health_pb2.HealthCheckRequest(service=worker.client.health_service)
        try:
            reply = await health.Check(request, timeout=self._rpc_timeout)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            if serving and not worker.healthy:
                info = await worker.client.model_info(self._rpc_timeout)
                serving = self._learn(worker, info)
        except grpc.aio.AioRpcError as e:
            log.debug("health check of %s failed: %s", worker.label, e.code().name)
            serving = False
        if serving != worker.healthy:
            log.info("%s is %s", worker.label, "healthy" if serving else "unhealthy")
        worker.healthy = serving
        return serving

    def _learn(self, worker: WorkerHandle, info: worker_pb2.GetModelInfoResponse) -> bool:
        """Take ``info`` in; False when it contradicts the worker's role."""
        worker.model_name = info.model_name
        worker.migration_limit = max(info.migration_limit, 0)
        role = info.role or "aggregated"  # workers from before roles were advertised
        if role != worker.role:
            log.warning(
                "%s reports role %r: not routing to it (add it with its own role)",
                worker.label,
                role,
            )
            return False
        if role == "prefill":
            if not info.bootstrap_port:
                log.warning("%s advertises no bootstrap port", worker.label)
                return False
            host = worker.address.rsplit(":", 1)[0]  # where we reach it; it may bind 0.0.0.0
            worker.bootstrap_address = f"{host}:{info.bootstrap_port}"
        return True

    def check_soon(self, worker: WorkerHandle) -> None:
        """``check`` in the background: a worker found by discovery takes traffic as soon as it
        answers, not at the next health-check round."""
        self._spawn(self._check_quietly(worker))

    async def _check_quietly(self, worker: WorkerHandle) -> None:
        with contextlib.suppress(Exception):  # e.g. its channel closed by a concurrent remove
            await self.check(worker)

    def mark_unhealthy(self, worker: WorkerHandle, reason: str) -> None:
        if worker.healthy:
            log.warning("%s marked unhealthy: %s", worker.label, reason)
        worker.healthy = False

    def start_health_checks(self, interval: float) -> None:
        self._spawn(self._health_loop(interval))

    async def _health_loop(self, interval: float) -> None:
        while True:
            # return_exceptions: one odd failure (e.g. a channel closed by a concurrent
            # RemoveWorker) must not end health checking for every worker
            await asyncio.gather(*(self.check(w) for w in self.all()), return_exceptions=True)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        """Stop health checks and close every channel (in-flight calls are cancelled)."""
        for task in list(self._background):
            task.cancel()
        for worker in self._workers.values():
            await worker.client.close()
            await worker.channel.close()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
