"""The gRPC server every pdmesh service runs, and the process plumbing around it.

``RpcServer`` is a ``grpc.aio`` server with the standard ``grpc.health.v1`` service (SERVING
for "" and for each of the service's names once started, NOT_SERVING while draining), server
reflection, and ``ErrorInterceptor`` mapping exceptions to status codes. ``serve_until_signal``
runs it until SIGTERM/SIGINT and then drains in-flight calls for a grace period.

    rpc = RpcServer(["pdmesh.v1.TokenizerService"])
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(servicer, rpc.server)
    await serve_until_signal(rpc, host, port, grace=5.0)
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pdmesh.rpc import keepalive
from pdmesh.rpc.errors import ErrorInterceptor
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # long prompts as token ids fit with room to spare
SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # grpc sets SO_REUSEPORT by default, so a second server on a taken port would start and
    # silently share it; without it, binding a taken port fails loudly.
    ("grpc.so_reuseport", 0),
    # callers ping to find out a hung peer (pdmesh.rpc.keepalive): accept their pings
    *keepalive.SERVER_OPTIONS,
)
LOG_LEVELS = ("debug", "info", "warning", "error")


class RpcServer:
    def __init__(
        self,
        service_names: Sequence[str],
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_receive_bytes: int = MAX_MESSAGE_BYTES,
        tls: TLSConfig = PLAINTEXT,
    ) -> None:
        """``service_names``: full names of the services the caller will add to ``server``
        (e.g. "pdmesh.v1.TokenizerService"), for health and reflection. A request message
        larger than ``max_receive_bytes`` is refused by grpc itself (RESOURCE_EXHAUSTED).
        ``tls``: the port serves TLS (or mutual TLS) when it has a certificate."""
        self.service_names = tuple(service_names)
        self.tls = tls
        receive = "grpc.max_receive_message_length"
        options = (*(o for o in SERVER_OPTIONS if o[0] != receive), (receive, max_receive_bytes))
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor(), *interceptors], options=options
        )
        # called as the drain starts: long-lived streams (WorkerService.Stream,
        # RouterService.Stream) stop taking new requests and end once their open ones finished,
        # or the grace period would always run out waiting for them
        self.on_drain: list[Callable[[], object]] = []
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )

    async def start(self, host: str, port: int) -> int:
        """Bind ``host:port`` (port 0 picks a free one), start serving; return the port."""
        address = (
            f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
        )
        try:
            bound = self.tls.add_port(self.server, address)
        except RuntimeError as e:
            raise OSError(f"cannot listen on {address}: {e}") from e
        if bound == 0:  # older grpc returns 0 instead of raising
            raise OSError(f"cannot listen on {address}")
        await self.server.start()
        if self.tls.serves_tls:
            log.info("%s: %s on port %d", ", ".join(self.service_names), self.tls.mode, bound)
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING (so balancers stop sending), then let calls finish for ``grace``
        seconds before cancelling what is left."""
        await self.health.enter_graceful_shutdown()
        for hook in self.on_drain:
            hook()
        await self.server.stop(grace)


async def wait_for_signal(
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> signal.Signals:
    """Wait for the first of ``signals``; return it."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in signals:
        loop.add_signal_handler(sig, _resolve_once, received, sig)
    try:
        return await received
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _resolve_once(future: asyncio.Future[signal.Signals], sig: signal.Signals) -> None:
    if not future.done():
        future.set_result(sig)


async def serve_until_signal(rpc: RpcServer, host: str, port: int, grace: float) -> None:
    """Start ``rpc`` on ``host:port``, serve until SIGTERM/SIGINT, then drain and stop."""
    bound = await rpc.start(host, port)
    log.info("%s listening on %s:%d", ", ".join(rpc.service_names), host, bound)
    sig = await wait_for_signal()
    log.info("%s received; draining in-flight calls for up to %.1fs", sig.name, grace)
    await rpc.stop(grace)
    log.info("stopped")


def configure_logging(level: str) -> None:
    """One log format for every service process: time, level, logger, message."""
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
