"""The decode worker's disaggregated side (``--mode decode``): its KV receiver, its client of
prefill bootstrap servers, the heartbeat monitor and the ``DisaggDecoder`` that uses them.

The receiver is opened before the server starts (the ``grpc`` transfer backend hosts its
``KVReceiverService`` on the worker's own server); the registration that decode workers send to
prefills is built once the server is bound, since with ``--port 0`` only then is the address
known.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid

from pdmesh.engine import AsyncEngine
from pdmesh.kv_transfer import KVReceiver, get_backend
from pdmesh.kv_transfer.grpc_backend import GrpcReceiver
from pdmesh.kv_transfer.mooncake_transport import MOONCAKE_BACKENDS, describe
from pdmesh.pd import wire
from pdmesh.pd.decode import DisaggDecoder
from pdmesh.pd.heartbeat import HeartbeatMonitor
from pdmesh.pd.peers import PrefillPeers
from pdmesh.rpc.server import RpcServer
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from services.decode.config import WorkerServiceConfig

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0  # deadline of a RegisterDecode call (also bounded by --waiting-timeout)


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
        self.peers.registration = wire.registration_to_pb(self.decode_id, address, handles)
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


def open_decode_side(
    config: WorkerServiceConfig, engine: AsyncEngine, rpc: RpcServer, tls: TLSConfig = PLAINTEXT
) -> DecodeSide:
    """Open the KV receiver on ``engine``'s cache (hosting it on ``rpc`` when the backend
    serves over gRPC, so it is as secure as the worker's port) and wire up the decode side;
    ``tls`` secures its calls to prefill bootstrap servers."""
    llm = engine.engine
    layout = llm.kv_layout()
    backend = get_backend(config.kv_transfer_backend)
    host = config.kv_transfer_host or config.host
    receiver: KVReceiver
    hosted = backend.receiver is GrpcReceiver
    if hosted:
        # on the worker's own server (before it starts); started() fills in the bound port
        grpc_receiver = GrpcReceiver.open(
            llm.runner.kv_cache, layout, host, address=f"{host}:{config.port}"
        )
        grpc_receiver.add_to_server(rpc.server)
        receiver = grpc_receiver
    else:
        options = {}
        if backend.name in MOONCAKE_BACKENDS:
            options = {
                "protocol": config.kv_transfer_protocol,
                "device_name": config.disaggregation_ib_device,
            }
        receiver = backend.receiver.open(llm.runner.kv_cache, layout, host, **options)
    peers = PrefillPeers(REGISTER_TIMEOUT_S, tls)
    monitor = HeartbeatMonitor(
        peers.ping,
        config.heartbeat_interval,
        config.heartbeat_max_failures,
        on_lost=peers.forget,
    )
    decoder = DisaggDecoder(engine, layout, peers, monitor, config.waiting_timeout)
    return DecodeSide(receiver, hosted, peers, monitor, decoder)
