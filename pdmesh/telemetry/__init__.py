"""Tracing (OpenTelemetry, configured by ``OTEL_*``), metrics (Prometheus) and the Prometheus
service discovery endpoint over Consul.

A gRPC service:

    setup_tracing("pdmesh-router")                     # no-op unless OTEL_* ask for traces
    metrics = Metrics()
    rpc = RpcServer([...], interceptors=[metrics.grpc_interceptor(), *server_interceptors()])
    metrics_server = start_metrics_server(metrics, config.host, telemetry.metrics_port)
    channel = grpc.aio.insecure_channel(addr, interceptors=client_interceptors())

The span vocabulary is in ``spans``; ``span``/``event`` add the hand-made ones.
"""

from pdmesh.telemetry.config import TelemetryConfig
from pdmesh.telemetry.metrics import Metrics, MetricsServer, TokenTimer, start_metrics_server
from pdmesh.telemetry.propagation import (
    TracingMiddleware,
    client_interceptors,
    extract_headers,
    inject_metadata,
    server_interceptors,
)
from pdmesh.telemetry.tracing import (
    current_span,
    event,
    set_attributes,
    setup_tracing,
    span,
    start_detached_span,
    trace_carrier,
    tracing_enabled,
    tracing_installed,
)

__all__ = [
    "Metrics",
    "MetricsServer",
    "TelemetryConfig",
    "TokenTimer",
    "TracingMiddleware",
    "client_interceptors",
    "current_span",
    "event",
    "extract_headers",
    "inject_metadata",
    "server_interceptors",
    "set_attributes",
    "setup_tracing",
    "span",
    "start_detached_span",
    "start_metrics_server",
    "trace_carrier",
    "tracing_enabled",
    "tracing_installed",
]
