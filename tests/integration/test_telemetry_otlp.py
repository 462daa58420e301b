"""End to end: two real processes configured only by ``OTEL_*`` export one trace to in-process
OTLP receivers — the HTTP front over OTLP/HTTP (protobuf), the gRPC back over OTLP/gRPC.

    curl (traceparent) → frontend: TracingMiddleware → client_interceptors ─gRPC─►
        backend: server_interceptors → span("prefill") + event("first_token")

The frontend samples with ``parentbased_traceidratio`` at ratio 0: a request that arrives with
a sampled ``traceparent`` is traced (parent-based), one without is not — at either hop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pdmesh.discovery.dev_agent import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"

BACKEND = """
import asyncio, sys
import grpc
from pdmesh.rpc.server import RpcServer, serve_until_signal
from pdmesh.telemetry import event, server_interceptors, setup_tracing, span
from pdmesh.telemetry.spans import FIRST_TOKEN, PREFILL

async def say(request, context):
    with span(PREFILL, prompt_tokens=3, cached_tokens=1):
        event(FIRST_TOKEN)
    return request.upper()

async def main(port):
    setup_tracing("pdmesh-test-backend")
    rpc = RpcServer(["pdmesh.test.Echo"], interceptors=server_interceptors())
    handler = grpc.method_handlers_generic_handler(
        "pdmesh.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
    rpc.server.add_generic_rpc_handlers((handler,))
    await serve_until_signal(rpc, "127.0.0.1", port, 1.0)

asyncio.run(main(int(sys.argv[1])))
"""

FRONTEND = """
import signal, sys
import grpc.aio, uvicorn
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from pdmesh.telemetry import TracingMiddleware, client_interceptors, setup_tracing

setup_tracing("pdmesh-test-frontend")
port, backend = int(sys.argv[1]), sys.argv[2]

async def ask(request):
    async with grpc.aio.insecure_channel(backend, interceptors=client_interceptors()) as ch:
        reply = await ch.unary_unary("/pdmesh.test.Echo/Say")(b"hi")
    return PlainTextResponse(reply.decode())

app = TracingMiddleware(Starlette(routes=[Route("/ask", ask)]))
# uvicorn restores the handler it found and raises SIGTERM again once it has shut down: exit
# normally instead (as the gateway does), so the tracer provider's atexit flush runs
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
"""


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, object]
    events: list[str]


class Collected:
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(
                            Span(
                                service=attrs.get("service.name", ""),
                                trace_id=s.trace_id.hex(),
                                span_id=s.span_id.hex(),
                                parent_id=s.parent_span_id.hex(),
                                name=s.name,
                                attributes={
                                    a.key: a.value.int_value or a.value.string_value
                                    for a in s.attributes
                                },
                                events=[e.name for e in s.events],
                            )
                        )

    def one(self, name: str, service: str) -> Span:
        found = [s for s in self.spans if s.name == name and s.service == service]
        assert len(found) == 1, f"{name} in {service}: {found} of {self.spans}"
        return found[0]


class GrpcReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collected: Collected) -> None:
        self.collected = collected

    def Export(  # noqa: N802 (the proto's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.collected.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def receivers() -> Iterator[tuple[Collected, int, int]]:
    """Spans collected, the OTLP/gRPC port, the OTLP/HTTP port."""
    collected = Collected()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(GrpcReceiver(collected), grpc_server)
    grpc_port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()

    class HttpReceiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            assert self.path == "/v1/traces"
            body = self.rfile.read(int(self.headers["Content-Length"]))
            collected.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: object) -> None:
            pass

    http_server = ThreadingHTTPServer(("127.0.0.1", 0), HttpReceiver)
    threading.Thread(target=http_server.serve_forever, daemon=True).start()
    yield collected, grpc_port, http_server.server_address[1]
    http_server.shutdown()
    grpc_server.stop(0)


def start(script: Path, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def wait_listening(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise AssertionError(f"nothing listens on {port}:\n{log.read_text()}")


def stop(proc: subprocess.Popen[bytes], log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert code == 0, log.read_text()


def test_one_trace_across_http_and_grpc(
    tmp_path: Path, receivers: tuple[Collected, int, int]
) -> None:
    collected, grpc_port, http_port = receivers
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    base["PYTHONPATH"] = str(REPO_ROOT)
    base["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # ms; the exit flushes anyway
    backend_env = base | {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{grpc_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    frontend_env = base | {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{http_port}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    backend_script, frontend_script = tmp_path / "backend.py", tmp_path / "frontend.py"
    backend_script.write_text(textwrap.dedent(BACKEND))
    frontend_script.write_text(textwrap.dedent(FRONTEND))
    backend_port, frontend_port = free_port(), free_port()
    backend_log, frontend_log = tmp_path / "backend.log", tmp_path / "frontend.log"
    backend = start(backend_script, [str(backend_port)], backend_env, backend_log)
    frontend = start(
        frontend_script,
        [str(frontend_port), f"127.0.0.1:{backend_port}"],
        frontend_env,
        frontend_log,
    )
    try:
        wait_listening(backend_port, backend, backend_log)
        wait_listening(frontend_port, frontend, frontend_log)
        url = f"http://127.0.0.1:{frontend_port}/ask"
        with urllib.request.urlopen(url, timeout=10) as r:  # unsampled at ratio 0
            assert r.read() == b"HI"
        traced = urllib.request.Request(
            url, headers={"traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01"}
        )
        with urllib.request.urlopen(traced, timeout=10) as r:
            assert r.read() == b"HI"
    finally:
        for proc, log in ((frontend, frontend_log), (backend, backend_log)):
            if proc.poll() is None:
                stop(proc, log)

    assert {s.trace_id for s in collected.spans} == {TRACE_ID}, "only the sampled request"
    http = collected.one("GET /ask", "pdmesh-test-frontend")
    client = collected.one("/pdmesh.test.Echo/Say", "pdmesh-test-frontend")
    server = collected.one("/pdmesh.test.Echo/Say", "pdmesh-test-backend")
    prefill = collected.one("prefill", "pdmesh-test-backend")
    assert http.parent_id == CALLER_SPAN_ID
    assert http.attributes["http.response.status_code"] == 200
    assert client.parent_id == http.span_id
    assert server.parent_id == client.span_id
    assert prefill.parent_id == server.span_id
    assert prefill.attributes["pdmesh.prompt_tokens"] == 3
    assert prefill.events == ["first_token"]
    assert len(collected.spans) == 4
