"""What every pdmesh gRPC service does the same way to be found, observed and secured: the
discovery, TLS and telemetry flags, tracing, the ``/metrics`` server, the server interceptors,
and serving while registered.

    parser = ...; add_mesh_args(parser)
    mesh = MeshOptions.from_args(args)
    observed = Observed.start("pdmesh-tokenizer", config.host, mesh.telemetry)
    rpc = RpcServer([SERVICE_NAME], interceptors=observed.interceptors(), tls=mesh.tls)
    registration = registration_for(mesh.discovery, TOKENIZER, config.host, 0,
                                    meta={META_MODEL: ..., **observed.meta()},
                                    grpc_tls=mesh.tls.serves_tls)
    await observed.serve(rpc, config.host, config.port, config.grace_period,
                         make_discovery(mesh.discovery), registration)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

import grpc.aio

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import (
    META_METRICS_PORT,
    NO_HOOKS,
    ConsulError,
    Discovery,
    DiscoveryConfig,
    ServeHooks,
    ServiceRegistration,
    serve_registered,
)
from pdmesh.rpc.server import RpcServer
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import (
    Metrics,
    MetricsServer,
    TelemetryConfig,
    server_interceptors,
    setup_tracing,
    start_metrics_server,
)

log = logging.getLogger(__name__)


def add_mesh_args(parser: argparse.ArgumentParser, telemetry: bool = True) -> None:
    """The discovery flags (``--discovery``, ``--consul-addr``…), the TLS flags (``--tls-cert``
    …) and, with ``telemetry``, ``--metrics-port``, in groups of their own so ``--help`` reads
    by topic."""
    discovery = parser.add_argument_group("discovery (Consul)")
    # argument groups share add_argument with the parser, which is all add_dataclass_args uses
    add_dataclass_args(cast(argparse.ArgumentParser, discovery), DiscoveryConfig)
    tls = parser.add_argument_group(
        "TLS (every gRPC server and client of this process; the same mode across the mesh)"
    )
    add_dataclass_args(cast(argparse.ArgumentParser, tls), TLSConfig)
    if telemetry:
        metrics = parser.add_argument_group(
            "telemetry (tracing follows the standard OTEL_* environment variables)"
        )
        add_dataclass_args(cast(argparse.ArgumentParser, metrics), TelemetryConfig)


def service_parser(
    prog: str,
    description: str,
    *configs: type | tuple[str, type],
    telemetry: bool = True,
) -> argparse.ArgumentParser:
    """Every service's command line: the flags of its config dataclasses (a ``(title, cls)``
    pair gets a ``--help`` group of its own), then the mesh's (``add_mesh_args``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for config in configs:
        if isinstance(config, tuple):
            title, cls = config
            # argument groups share add_argument with the parser, which is all it uses
            group = cast(argparse.ArgumentParser, parser.add_argument_group(title))
            add_dataclass_args(group, cls)
        else:
            add_dataclass_args(parser, config)
    add_mesh_args(parser, telemetry)
    return parser


@dataclass(frozen=True)
class MeshOptions:
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    tls: TLSConfig = PLAINTEXT

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MeshOptions:
        """Raises ``ValueError`` for bad values (an unreadable --tls-cert…), as ``from_args``
        does."""
        telemetry = (
            from_args(TelemetryConfig, args) if hasattr(args, "metrics_port") else TelemetryConfig()
        )
        return cls(from_args(DiscoveryConfig, args), telemetry, from_args(TLSConfig, args))


class Observed:
    """Tracing and metrics of one service process."""

    def __init__(self, metrics: Metrics, metrics_server: MetricsServer | None) -> None:
        self.metrics = metrics
        self.metrics_server = metrics_server

    @classmethod
    def start(cls, service_name: str, host: str, telemetry: TelemetryConfig) -> Observed:
        """Set up tracing (a no-op unless ``OTEL_*`` ask for it) and start ``/metrics`` on
        ``--metrics-port`` (none when -1)."""
        setup_tracing(service_name)
        metrics = Metrics()
        server = start_metrics_server(metrics, host, telemetry.metrics_port)
        if server is not None:
            log.info("Prometheus metrics on http://%s:%d/metrics", host, server.port)
        return cls(metrics, server)

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        # metrics outermost: a call's duration includes the tracing work around it
        return [self.metrics.grpc_interceptor(), *server_interceptors()]

    def meta(self) -> Mapping[str, object]:
        """Consul meta that tells Prometheus' service discovery where ``/metrics`` is."""
        if self.metrics_server is None:
            return {}
        return {META_METRICS_PORT: self.metrics_server.port}

    async def serve(
        self,
        rpc: RpcServer,
        host: str,
        port: int,
        grace: float,
        discovery: Discovery,
        registration: ServiceRegistration,
        hooks: ServeHooks = NO_HOOKS,
    ) -> None:
        """``serve_registered``, then the ``/metrics`` server stops too."""
        try:
            await serve_registered(rpc, host, port, grace, discovery, registration, hooks)
        finally:
            self.close()

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            self.metrics_server = None


T = TypeVar("T")


def parse_configs(
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    build: Callable[[argparse.Namespace], T],
) -> T | None:
    """``build`` the service's configs from its flags; None (and the reason on stderr) when a
    value is invalid — the caller exits 2, as argparse does for malformed flags."""
    args = parser.parse_args(argv)
    try:
        return build(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def run_service(main: Coroutine[Any, Any, None], refusals: tuple[type[Exception], ...] = ()) -> int:
    """Run a service's main coroutine; 1 with a one-line reason when the outside world refuses
    it (a port taken, Consul refusing the registration, or one of ``refusals``), else 0."""
    refused: tuple[type[Exception], ...] = (OSError, *refusals)
    try:
        asyncio.run(main)
    except ConsulError as e:  # e.g. an ACL token that may not register
        print(f"error: cannot register with Consul: {e}", file=sys.stderr)
        return 1
    except refused as e:  # e.g. the port is taken
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
