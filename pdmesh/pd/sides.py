"""The two sides of PD disaggregation wired up on a worker's engine: ``PrefillSide`` (KV sender,
room table, bootstrap logic, ``PrefillRunner``) and ``DecodeSide`` (KV receiver, prefill peers,
heartbeat monitor, ``DisaggDecoder``). The worker service opens the side its role asks for and
serves it over gRPC; nothing here knows a proto type.

A decode's receiver is opened before the server starts (the ``grpc`` transfer backend hosts its
``KVReceiverService`` on the worker's own server); the registration that decode workers send to
prefills is built once the server is bound, since with ``--port 0`` only then is the address
known.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from pdmesh.engine import AsyncEngine
from pdmesh.errors import AbortedError
from pdmesh.kv_transfer import KVReceiver, KVSender, get_backend
from pdmesh.kv_transfer.grpc_backend import GrpcReceiver
from pdmesh.kv_transfer.mooncake_transport import MOONCAKE_BACKENDS, describe
from pdmesh.pd.bootstrap import Bootstrap
from pdmesh.pd.budget import OptimisticBudget
from pdmesh.pd.decode import DisaggDecoder
from pdmesh.pd.heartbeat import HeartbeatMonitor
from pdmesh.pd.peers import PrefillPeers
from pdmesh.pd.prefill import PrefillRunner
from pdmesh.pd.registry import DecodePeer, DecodeRegistry
from pdmesh.pd.rooms import RoomTable
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Transfer:
    """How this worker's KV transfer engine is opened (the ``--kv-transfer-*`` flags)."""

    backend: str
    host: str  # where peers reach this host's transfer engine
    protocol: str  # mooncake's transport: rdma, tcp or auto
    ib_device: str  # mooncake's RDMA devices, comma-separated; empty: all

    def options(self, backend: str) -> dict[str, object]:
        if backend in MOONCAKE_BACKENDS:
            return {"protocol": self.protocol, "device_name": self.ib_device}
        return {}


class PrefillSide:
    def __init__(
        self, sender: KVSender, rooms: RoomTable, bootstrap: Bootstrap, runner: PrefillRunner
    ) -> None:
        self.sender = sender
        self.rooms = rooms
        self.bootstrap = bootstrap
        self.runner = runner

    @property
    def transport(self) -> str:
        return self.sender.transport

    def fail_all(self) -> None:
        """The worker drained: every room left fails (and frees its pages)."""
        self.rooms.fail_all(AbortedError("the prefill worker is shutting down"))

    async def close(self) -> None:
        await self.sender.close()


def open_prefill_side(
    engine: AsyncEngine,
    transfer: Transfer,
    bootstrap_timeout: float,
    transfer_timeout: float,
    optimistic_share: float,
    tls: TLSConfig = PLAINTEXT,
) -> PrefillSide:
    """Open the KV sender on ``engine``'s cache and the prefill logic around it; ``tls``
    secures the ``grpc`` backend's calls to decode workers' ports, which serve TLS when the
    mesh does (mooncake's and cuda_ipc's transports have no TLS: see docs/architecture.md,
    Security)."""
    llm = engine.engine
    layout = llm.kv_layout()
    backend = get_backend(transfer.backend)
    options = {"tls": tls} if backend.name == "grpc" else transfer.options(backend.name)
    sender = backend.sender.open(llm.runner.kv_cache, layout, transfer.host, **options)
    rooms = RoomTable(bootstrap_timeout)
    bootstrap = Bootstrap(rooms, DecodeRegistry(layout, sender.refusal))
    budget = OptimisticBudget(layout.num_pages, layout.page_size, optimistic_share)
    runner = PrefillRunner(engine, rooms, bootstrap.decodes, sender, transfer_timeout, budget)
    return PrefillSide(sender, rooms, bootstrap, runner)


class DecodeSide:
    def __init__(
        self,
        receiver: KVReceiver,
        hosted: bool,
        peers: PrefillPeers,
        monitor: HeartbeatMonitor,
        decoder: DisaggDecoder,
    ) -> None:
        """``hosted``: the receiver is served by the worker's own gRPC server."""
        self.receiver = receiver
        self.hosted = hosted
        self.peers = peers
        self.monitor = monitor
        self.decoder = decoder
        # a fresh id per process: a prefill holding our old registration refuses the new us
        self.decode_id = uuid.uuid4().hex

    def started(self, host: str, port: int) -> None:
        """The worker's server is bound to ``port``; ``host`` is where others reach it.
        Registrations can be made from now on."""
        address = f"{host}:{port}"
        handles = self.receiver.handles
        if self.hosted:  # senders reach it where they reach us
            handles = [dataclasses.replace(h, address=address) for h in handles]
        self.peers.registration = DecodePeer(
            self.decode_id, address, handles[0], tuple(handles[1:])
        )
        self.monitor.start()
        log.info(
            "decode side ready: KV receiver %s (%s), decode id %s",
            handles[0].address,
            ", ".join(describe(h.backend, h.transport) for h in handles),
            self.decode_id,
        )

    async def close(self) -> None:
        await self.decoder.close()
        await self.monitor.stop()
        await self.peers.close()
        self.receiver.close()


@dataclass(frozen=True)
class Heartbeat:
    """The decode's watch on its prefills (the ``--heartbeat-*`` flags)."""

    interval: float
    max_failures: int


def open_decode_side(
    engine: AsyncEngine,
    transfer: Transfer,
    port: int,
    peers: PrefillPeers,
    heartbeat: Heartbeat,
    waiting_timeout: float,
    host_receiver: Callable[[GrpcReceiver], None],
) -> DecodeSide:
    """Open the KV receiver on ``engine``'s cache and wire up the decode side around
    ``peers``. A receiver that serves over gRPC is handed to ``host_receiver`` to be added to
    the worker's own server (before it starts), so it is as secure as the worker's port."""
    llm = engine.engine
    layout = llm.kv_layout()
    backend = get_backend(transfer.backend)
    receiver: KVReceiver
    hosted = backend.receiver is GrpcReceiver
    if hosted:
        # on the worker's own server; started() fills in the bound port
        grpc_receiver = GrpcReceiver.open(
            llm.runner.kv_cache, layout, transfer.host, address=f"{transfer.host}:{port}"
        )
        host_receiver(grpc_receiver)
        receiver = grpc_receiver
    else:
        options = transfer.options(backend.name)
        receiver = backend.receiver.open(llm.runner.kv_cache, layout, transfer.host, **options)
    monitor = HeartbeatMonitor(
        peers.ping, heartbeat.interval, heartbeat.max_failures, on_lost=peers.forget
    )
    decoder = DisaggDecoder(engine, layout, peers, monitor, waiting_timeout)
    return DecodeSide(receiver, hosted, peers, monitor, decoder)
