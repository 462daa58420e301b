"""Tracing and metrics interceptors on a real grpc.aio client → server hop (in-process SDK
provider with an in-memory exporter; the global provider is left alone)."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from prometheus_client import CollectorRegistry

from pdmesh.errors import InvalidRequestError
from pdmesh.rpc.server import RpcServer
from pdmesh.telemetry import Metrics, client_interceptors, server_interceptors
from pdmesh.telemetry.metrics import start_metrics_server

SERVICE = "pdmesh.test.Echo"


async def say(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    if request == b"bad":
        raise InvalidRequestError("prompt", "bad prompt")
    return request.upper()


async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for i in range(int(request)):
        yield str(i).encode()


def echo_handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Say": grpc.unary_unary_rpc_method_handler(say),
            "Count": grpc.unary_stream_rpc_method_handler(count),
        },
    )


@pytest.fixture
def provider() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracer_provider, exporter


def by_name(spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == name and s.kind == kind]
    return found


def test_context_crosses_the_hop_and_errors_are_marked(
    provider: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    tracer_provider, exporter = provider
    metrics = Metrics(CollectorRegistry())

    async def scenario() -> None:
        interceptors = [metrics.grpc_interceptor(), *server_interceptors(tracer_provider)]
        rpc = RpcServer([SERVICE], interceptors=interceptors)
        rpc.server.add_generic_rpc_handlers((echo_handler(),))
        port = await rpc.start("127.0.0.1", 0)
        tracer = tracer_provider.get_tracer("test")
        channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", interceptors=client_interceptors(tracer_provider)
        )
        try:
            with tracer.start_as_current_span("request") as root:
                assert await channel.unary_unary(f"/{SERVICE}/Say")(b"hi") == b"HI"
                replies = [r async for r in channel.unary_stream(f"/{SERVICE}/Count")(b"3")]
                assert replies == [b"0", b"1", b"2"]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await channel.unary_unary(f"/{SERVICE}/Say")(b"bad")
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                health = health_pb2_grpc.HealthStub(channel)
                await health.Check(health_pb2.HealthCheckRequest())
            trace_id = root.get_span_context().trace_id
        finally:
            await channel.close()
            await rpc.stop(0)

        spans = exporter.get_finished_spans()
        assert not [s for s in spans if "grpc.health" in s.name], "health checks are not traced"
        say_name, count_name = f"/{SERVICE}/Say", f"/{SERVICE}/Count"
        assert {s.context.trace_id for s in spans} == {trace_id}, "one trace across the hop"
        server_spans = [s for s in spans if s.kind == SpanKind.SERVER]
        assert len(server_spans) == 3
        for server in server_spans:
            # each server span's parent is a client span of the same call (W3C in metadata)
            assert server.parent is not None
            (client,) = [s for s in spans if s.context.span_id == server.parent.span_id]
            assert client.kind == SpanKind.CLIENT and client.name == server.name
            assert (
                client.parent is not None
                and client.parent.span_id == root.get_span_context().span_id
            )
        stream_server = by_name(spans, count_name, SpanKind.SERVER)
        assert stream_server.status.status_code != StatusCode.ERROR
        failed = [
            s
            for s in server_spans
            if s.name == say_name and s.status.status_code == StatusCode.ERROR
        ]
        assert len(failed) == 1
        assert failed[0].attributes is not None
        assert (
            failed[0].attributes["rpc.grpc.status_code"]
            == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        )

        sample = metrics.registry.get_sample_value
        assert sample("pdmesh_requests_total", {"method": say_name, "code": "OK"}) == 1
        assert sample("pdmesh_requests_total", {"method": count_name, "code": "OK"}) == 1
        bad = {"method": say_name, "code": "INVALID_ARGUMENT"}
        assert sample("pdmesh_requests_total", bad) == 1
        assert sample("pdmesh_request_errors_total", bad) == 1
        assert sample("pdmesh_requests_in_flight", {"method": say_name}) == 0
        assert sample("pdmesh_request_duration_seconds_count", {"method": count_name}) == 1
        health_check = {"method": "/grpc.health.v1.Health/Check", "code": "OK"}
        assert sample("pdmesh_requests_total", health_check) is None

    asyncio.run(scenario())


def test_interceptors_are_absent_without_a_provider() -> None:
    # nothing installed globally in the test process: tracing is off, and costs no interceptor
    if trace.get_tracer_provider().__class__.__name__ != "ProxyTracerProvider":
        pytest.skip("another test installed a global tracer provider")
    assert server_interceptors() == []
    assert client_interceptors() == []


def test_metrics_server_serves_the_registry() -> None:
    metrics = Metrics(CollectorRegistry())
    metrics.observe("/x/Y", "OK", 0.01, failed=False)
    timer = metrics.token_timer()
    timer.tokens(1)
    timer.tokens(2)
    server = start_metrics_server(metrics, "127.0.0.1", 0)
    assert server is not None and server.port > 0
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        server.close()
    assert 'pdmesh_requests_total{code="OK",method="/x/Y"} 1.0' in body
    assert "pdmesh_time_to_first_token_seconds_count 1.0" in body
    assert "pdmesh_inter_token_latency_seconds_count 2.0" in body
    assert "pdmesh_output_tokens_total 3.0" in body
    assert "process_cpu_seconds_total" in body
    assert start_metrics_server(metrics, "127.0.0.1", -1) is None
