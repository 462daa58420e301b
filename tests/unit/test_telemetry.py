"""Telemetry without services: OTEL_* parsing, tracing off/on (in fresh interpreters, since the
global provider can be set once per process), span helpers, the HTTP middlewares, metrics
families and the Prometheus http_sd JSON."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, StaticSampler, TraceIdRatioBased
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from pdmesh.discovery import Endpoint
from pdmesh.telemetry import Metrics, TelemetryConfig, TracingMiddleware
from pdmesh.telemetry.http_sd import http_sd_targets
from pdmesh.telemetry.tracing import (
    exporters_from_env,
    parse_ratio,
    sampler_from_env,
    tracing_enabled,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "none,console"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, False),
    ],
)
def test_tracing_enabled(env: dict[str, str], enabled: bool) -> None:
    assert tracing_enabled(env) is enabled


def test_samplers() -> None:
    default = sampler_from_env({})
    assert isinstance(default, ParentBased)
    ratio = sampler_from_env(
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    )
    assert isinstance(ratio, TraceIdRatioBased) and ratio.rate == 0.25
    parent = sampler_from_env(
        {"OTEL_TRACES_SAMPLER": "ParentBased_TraceIdRatio", "OTEL_TRACES_SAMPLER_ARG": "0"}
    )
    assert isinstance(parent, ParentBased)
    assert "TraceIdRatioBased{0.0}" in parent.get_description()
    assert isinstance(sampler_from_env({"OTEL_TRACES_SAMPLER": "always_off"}), StaticSampler)
    assert parse_ratio(None) == parse_ratio(" ") == 1.0
    assert parse_ratio("1") == 1.0


@pytest.mark.parametrize("bad", ["abc", "1.5", "-0.1", "nan"])
def test_bad_ratio_is_an_error(bad: str) -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG"):
        sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": bad})


def test_unknown_sampler_and_exporter_are_errors() -> None:
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        sampler_from_env({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ValueError, match="http/json"):
        exporters_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_exporters() -> None:
    (grpc_exporter,) = exporters_from_env({})
    assert isinstance(grpc_exporter, GrpcExporter)
    (http_exporter,) = exporters_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert isinstance(http_exporter, HttpExporter)
    # the traces-specific protocol wins over the general one
    (specific,) = exporters_from_env(
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        }
    )
    assert isinstance(specific, HttpExporter)
    both = exporters_from_env({"OTEL_TRACES_EXPORTER": "console,none"})
    assert [type(e) for e in both] == [ConsoleSpanExporter]
    for exporter in (grpc_exporter, http_exporter, specific):
        exporter.shutdown()


def run_python(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO_ROOT,
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tracing_off_installs_nothing() -> None:
    out = run_python(
        """
        from opentelemetry import trace
        from pdmesh.telemetry import client_interceptors, server_interceptors, setup_tracing, span
        setup_tracing("pdmesh-router")
        assert type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider"
        assert server_interceptors() == [] and client_interceptors() == []
        with span("route", policy="rr") as s:
            assert not s.is_recording()
        print("off")
        """,
        OTEL_SERVICE_NAME="ignored",
    )
    assert out.strip() == "off"


def test_tracing_on_installs_a_provider_and_span_helpers_work() -> None:
    out = run_python(
        """
        from opentelemetry import trace
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from pdmesh.telemetry import event, server_interceptors, set_attributes, setup_tracing, span
        setup_tracing("pdmesh-router")
        provider = trace.get_tracer_provider()
        assert provider.resource.attributes["service.name"] == "from-env"
        assert "TraceIdRatioBased{1.0}" in provider.sampler.get_description()
        assert len(server_interceptors()) == 2
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        with span("route", policy="rr", worker=None, attributes={"raw.key": 1}):
            set_attributes(cache_match_tokens=7)
            event("first_token")
        try:
            with span("decode"):
                raise RuntimeError("boom")
        except RuntimeError:
            pass
        route, decode = memory.get_finished_spans()
        assert dict(route.attributes) == {
            "pdmesh.policy": "rr", "raw.key": 1, "pdmesh.cache_match_tokens": 7}
        assert [e.name for e in route.events] == ["first_token"]
        assert decode.status.status_code.name == "ERROR"
        print("on")
        """,
        OTEL_TRACES_EXPORTER="console",
        OTEL_SERVICE_NAME="from-env",
        OTEL_TRACES_SAMPLER="traceidratio",
        OTEL_TRACES_SAMPLER_ARG="1.0",
    )
    assert out.splitlines()[0] == "on"
    assert '"name": "route"' in out  # the console exporter wrote the spans at exit


def test_tracing_middleware_continues_the_callers_trace() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def fail(request: Request) -> Response:
        return PlainTextResponse("no", status_code=503)

    routes = [Route("/ok", ok), Route("/fail", fail, methods=["POST"])]
    app = TracingMiddleware(Starlette(routes=routes), provider)

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
            assert (await client.get("/ok", headers={"traceparent": parent})).status_code == 200
            assert (await client.post("/fail")).status_code == 503

    asyncio.run(scenario())
    ok_span, fail_span = exporter.get_finished_spans()
    assert ok_span.name == "GET /ok" and ok_span.kind == SpanKind.SERVER
    assert ok_span.context.trace_id == 0x4BF92F3577B34DA6A3CE929D0E0E4736
    assert ok_span.parent is not None and ok_span.parent.span_id == 0x00F067AA0BA902B7
    assert ok_span.attributes is not None and ok_span.attributes["http.response.status_code"] == 200
    assert fail_span.name == "POST /fail" and fail_span.parent is None
    assert fail_span.status.status_code == StatusCode.ERROR


def test_metrics_middleware_and_endpoint() -> None:
    metrics = Metrics(CollectorRegistry())

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def boom(request: Request) -> Response:
        raise RuntimeError("boom")

    routes = [
        Route("/ok", ok),
        Route("/boom", boom),
        Route("/health", ok),
        Route("/metrics", metrics.endpoint),
    ]
    app = metrics.asgi_middleware(Starlette(routes=routes))

    async def scenario() -> str:
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            for path in ("/ok", "/ok", "/boom", "/health"):
                await client.get(path)
            return (await client.get("/metrics")).text

    body = asyncio.run(scenario())
    sample = metrics.registry.get_sample_value
    assert sample("pdmesh_requests_total", {"method": "GET /ok", "code": "200"}) == 2
    assert sample("pdmesh_request_errors_total", {"method": "GET /boom", "code": "500"}) == 1
    assert sample("pdmesh_requests_total", {"method": "GET /health", "code": "200"}) is None
    assert sample("pdmesh_requests_in_flight", {"method": "GET /ok"}) == 0
    assert 'pdmesh_requests_total{code="200",method="GET /ok"} 2.0' in body


def test_token_timer() -> None:
    metrics = Metrics(CollectorRegistry())
    timer = metrics.token_timer()
    timer.tokens(0)  # nothing arrived: nothing recorded
    timer.tokens(3)  # first chunk: one TTFT, no inter-token gaps
    timer.tokens(2)
    sample = metrics.registry.get_sample_value
    assert sample("pdmesh_time_to_first_token_seconds_count") == 1
    assert sample("pdmesh_inter_token_latency_seconds_count") == 2
    assert sample("pdmesh_output_tokens_total") == 5


def test_telemetry_config() -> None:
    assert TelemetryConfig().metrics_port == -1
    with pytest.raises(ValueError, match="metrics-port"):
        TelemetryConfig(metrics_port=-2)


def test_http_sd_targets() -> None:
    catalog = {
        "pdmesh-worker": [
            Endpoint("w2", "fe80::2", 50053, ("decode",), {"metrics_port": "9102"}),
            Endpoint(
                "w1",
                "10.0.0.1",
                50053,
                ("prefill", "canary"),
                {"metrics_port": "9101", "kv-transfer": "mooncake"},
            ),
            Endpoint("w3", "10.0.0.3", 50053, (), {"metrics_port": "off"}),
            Endpoint("w4", "10.0.0.4", 50053),
        ],
        "pdmesh-router": [],
    }
    groups = http_sd_targets(catalog)
    assert [g["targets"] for g in groups] == [["10.0.0.1:9101"], ["[fe80::2]:9102"]]
    labels = groups[0]["labels"]
    assert labels["service"] == "pdmesh-worker" and labels["service_id"] == "w1"
    assert labels["__meta_consul_tags"] == ",prefill,canary,"
    assert labels["__meta_consul_service_metadata_kv_transfer"] == "mooncake"
    assert http_sd_targets({}) == []
