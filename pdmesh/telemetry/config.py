"""``TelemetryConfig``: the one telemetry flag of a gRPC service. Tracing has no flags — it
follows the standard ``OTEL_*`` variables (see ``tracing``)."""

from __future__ import annotations

from dataclasses import dataclass

from pdmesh.config import flag


@dataclass(frozen=True)
class TelemetryConfig:
    metrics_port: int = flag(
        -1,
        "port of this service's Prometheus /metrics endpoint (on --host); -1: off, 0: any free "
        "port (logged, and registered in Consul meta so Prometheus finds it)",
        env="PDMESH_METRICS_PORT",
    )

    def __post_init__(self) -> None:
        if not -1 <= self.metrics_port <= 65535:
            raise ValueError(f"--metrics-port={self.metrics_port} must be -1 (off) or a port")
