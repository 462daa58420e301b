"""The worker's role — aggregated, decode or prefill — as a strategy object: the one server
(``services.worker.server.serve``) asks its role for what differs between them and does the
rest the same way. A role says which ``WorkerService`` servicer to add and which names the
server carries, opens and closes its PD side (``pdmesh.pd.sides``), and says what to register
in Consul (service, tag, meta)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol

from pdmesh.discovery import (
    META_BOOTSTRAP_PORT,
    META_IB_DEVICE,
    META_KV_BACKEND,
    META_KV_PROTOCOL,
    PREFILL,
    TAG_AGG,
    TAG_DECODE,
    TAG_PREFILL,
    WORKER,
)
from pdmesh.engine import AsyncEngine
from pdmesh.kv_transfer.grpc_backend import GrpcReceiver
from pdmesh.kv_transfer.mooncake_transport import describe
from pdmesh.pd.sides import (
    DecodeSide,
    Heartbeat,
    PrefillSide,
    Transfer,
    open_decode_side,
    open_prefill_side,
)
from pdmesh.rpc.server import RpcServer
from pdmesh.rpc.tls import TLSConfig
from pdmesh.telemetry import Metrics
from pdmesh.v1 import bootstrap_pb2_grpc, kv_transfer_pb2, worker_pb2
from services.sglang_grpc import servicer as sglang_grpc
from services.worker.bootstrap import SERVICE_NAME as BOOTSTRAP_SERVICE
from services.worker.bootstrap import BootstrapServicer
from services.worker.config import PDServerConfig, PrefillServiceConfig, WorkerServiceConfig
from services.worker.peers import GrpcPrefillPeers
from services.worker.prefill import PrefillServicer
from services.worker.servicer import WorkerServicer

log = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
KV_RECEIVER_SERVICE = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVReceiverService"].full_name
REGISTER_TIMEOUT_S = 10.0  # deadline of a RegisterDecode call (also bounded by --waiting-timeout)
BOOTSTRAP_DRAIN_S = 5.0  # after the worker drained: in-flight Transfer calls end with their rooms


def transfer_of(config: PDServerConfig) -> Transfer:
    return Transfer(
        config.kv_transfer_backend,
        config.kv_transfer_host or config.host,
        config.kv_transfer_protocol,
        config.disaggregation_ib_device,
    )


class WorkerHandlers(sglang_grpc.WorkerHandlers, Protocol):
    """What the server does with a role's servicer: add it as ``WorkerService`` (and under
    SGLang's scheduler protocol), and drain it."""

    def drain(self) -> None: ...


class Role(Protocol):
    """What differs between the worker's roles; see ``AggregatedRole`` for each member."""

    name: str
    telemetry_name: str
    service: str
    tag: str

    def service_names(self) -> list[str]: ...

    async def open(
        self, engine: AsyncEngine, rpc: RpcServer, tls: TLSConfig, metrics: Metrics
    ) -> None: ...

    @property
    def bootstrap_port(self) -> int: ...

    @property
    def migration_limit(self) -> int: ...

    def servicer(
        self, engine: AsyncEngine, model_info: worker_pb2.GetModelInfoResponse, metrics: Metrics
    ) -> WorkerHandlers: ...

    def meta(self) -> Mapping[str, object]: ...

    def started(self, bound: int) -> None: ...

    async def drained(self) -> None: ...

    async def close(self) -> None: ...


class AggregatedRole:
    """Prefill and decode in this worker; no PD side."""

    name = "aggregated"  # GetModelInfo's role
    telemetry_name = "pdmesh-decode"  # the tracing service name (one for every worker)
    service = WORKER  # the Consul service
    tag = TAG_AGG

    def __init__(self, config: WorkerServiceConfig) -> None:
        self.config = config

    def service_names(self) -> list[str]:
        """Names the worker's server carries beyond WorkerService and SGLang's scheduler."""
        return []

    async def open(
        self, engine: AsyncEngine, rpc: RpcServer, tls: TLSConfig, metrics: Metrics
    ) -> None:
        """Open the PD side, before the worker's server starts."""

    @property
    def bootstrap_port(self) -> int:
        return 0

    @property
    def migration_limit(self) -> int:
        """Advertised in GetModelInfo: how often the router may move a broken stream on."""
        return self.config.migration_limit

    def servicer(
        self, engine: AsyncEngine, model_info: worker_pb2.GetModelInfoResponse, metrics: Metrics
    ) -> WorkerServicer:
        return WorkerServicer(engine, model_info, None, self.config.stream_interval, metrics)

    def meta(self) -> Mapping[str, object]:
        """Consul meta beyond the model and page size (None values are left out)."""
        return {}

    def started(self, bound: int) -> None:
        """The worker's server is bound; nothing is registered yet."""
        log.info("%s (%s) listening on %s:%d", WORKER_SERVICE, self.name, self.config.host, bound)

    async def drained(self) -> None:
        """The worker's server stopped (its grace period is over)."""

    async def close(self) -> None:
        """After serving, also when start-up failed half-way."""


class DecodeRole(AggregatedRole):
    """The decode half of PD: requests with ``disagg`` get their KV from a prefill."""

    name = "decode"
    tag = TAG_DECODE

    def __init__(self, config: WorkerServiceConfig) -> None:
        super().__init__(config)
        self.side: DecodeSide | None = None

    def service_names(self) -> list[str]:
        if self.config.kv_transfer_backend == "grpc":
            return [KV_RECEIVER_SERVICE]  # hosted here: health and reflection name it
        return []

    async def open(
        self, engine: AsyncEngine, rpc: RpcServer, tls: TLSConfig, metrics: Metrics
    ) -> None:
        def host(receiver: GrpcReceiver) -> None:
            receiver.add_to_server(rpc.server)

        config = self.config
        self.side = open_decode_side(
            engine,
            transfer_of(config),
            config.port,
            GrpcPrefillPeers(REGISTER_TIMEOUT_S, tls),
            Heartbeat(config.heartbeat_interval, config.heartbeat_max_failures),
            config.waiting_timeout,
            host,
        )

    def servicer(
        self, engine: AsyncEngine, model_info: worker_pb2.GetModelInfoResponse, metrics: Metrics
    ) -> WorkerServicer:
        return WorkerServicer(engine, model_info, self.side, self.config.stream_interval, metrics)

    def meta(self) -> Mapping[str, object]:
        assert self.side is not None
        return {
            META_KV_BACKEND: self.config.kv_transfer_backend,
            META_KV_PROTOCOL: self.side.receiver.transport,
            META_IB_DEVICE: self.config.disaggregation_ib_device,
        }

    def started(self, bound: int) -> None:
        assert self.side is not None
        self.side.started(self.config.kv_transfer_host or self.config.host, bound)
        super().started(bound)

    async def close(self) -> None:
        if self.side is not None:
            await self.side.close()


class PrefillRole:
    """The prefill half of PD, with its ``BootstrapService`` on a port of its own."""

    name = "prefill"
    telemetry_name = "pdmesh-prefill"
    service = PREFILL
    tag = TAG_PREFILL

    def __init__(self, config: PrefillServiceConfig) -> None:
        self.config = config
        self.side: PrefillSide | None = None
        self._boot_rpc: RpcServer | None = None
        self._bootstrap_port = 0

    def service_names(self) -> list[str]:
        return []

    @property
    def bootstrap_port(self) -> int:
        return self._bootstrap_port

    @property
    def migration_limit(self) -> int:
        return 0  # a prefill streams nothing to migrate: it answers with one message

    async def open(
        self, engine: AsyncEngine, rpc: RpcServer, tls: TLSConfig, metrics: Metrics
    ) -> None:
        """The bootstrap server starts first: decodes must reach it as soon as the router
        sends work."""
        config = self.config
        self.side = side = open_prefill_side(
            engine,
            transfer_of(config),
            config.bootstrap_timeout,
            config.transfer_timeout,
            config.optimistic_prefill_share,
            tls,
        )
        # counted but not traced: decodes ping it every few seconds, and a root span per ping
        # would bury the requests' traces
        self._boot_rpc = RpcServer(
            [BOOTSTRAP_SERVICE], interceptors=[metrics.grpc_interceptor()], tls=tls
        )
        bootstrap_pb2_grpc.add_BootstrapServiceServicer_to_server(
            BootstrapServicer(side.bootstrap), self._boot_rpc.server
        )
        self._bootstrap_port = await self._boot_rpc.start(config.host, config.bootstrap_port)
        log.info("%s listening on %s:%d", BOOTSTRAP_SERVICE, config.host, self._bootstrap_port)

    def servicer(
        self, engine: AsyncEngine, model_info: worker_pb2.GetModelInfoResponse, metrics: Metrics
    ) -> PrefillServicer:
        assert self.side is not None
        return PrefillServicer(engine, self.side.runner, self.side.rooms, model_info)

    def meta(self) -> Mapping[str, object]:
        assert self.side is not None
        transport = self.side.transport
        return {
            META_KV_BACKEND: self.config.kv_transfer_backend,
            META_KV_PROTOCOL: transport,
            META_IB_DEVICE: self.config.disaggregation_ib_device if transport else None,
            META_BOOTSTRAP_PORT: self._bootstrap_port,
        }

    def started(self, bound: int) -> None:
        assert self.side is not None
        log.info(
            "%s (prefill, %s KV transfer) listening on %s:%d",
            WORKER_SERVICE,
            describe(self.config.kv_transfer_backend, self.side.transport),
            self.config.host,
            bound,
        )

    async def drained(self) -> None:
        if self.side is not None:
            self.side.fail_all()
        if self._boot_rpc is not None:
            await self._boot_rpc.stop(BOOTSTRAP_DRAIN_S)
            self._boot_rpc = None

    async def close(self) -> None:
        if self._boot_rpc is not None:  # start-up failed before serving
            await self._boot_rpc.stop(0)
        if self.side is not None:
            await self.side.close()


def role_for(config: WorkerServiceConfig | PrefillServiceConfig) -> Role:
    if isinstance(config, PrefillServiceConfig):
        return PrefillRole(config)
    return DecodeRole(config) if config.mode == "decode" else AggregatedRole(config)
