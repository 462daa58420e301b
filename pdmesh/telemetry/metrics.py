"""Prometheus metrics: one registry per process, the families every service shares, and the
ways to serve them.

    metrics = Metrics()                                        # in serve(), once
    rpc = RpcServer([...], interceptors=[metrics.grpc_interceptor(), *server_interceptors()])
    server = start_metrics_server(metrics, config.host, telemetry.metrics_port)   # or None
    ...
    timer = metrics.token_timer()    # per streamed request: TTFT, then inter-token latency
    timer.tokens(len(chunk.token_ids))

The gateway serves ``metrics.endpoint`` at ``/metrics`` on its own port and wraps its app in
``metrics.asgi_middleware`` for the request families. gRPC services serve ``/metrics`` from a
small HTTP server on ``--metrics-port`` (``-1``: off, the default, since several services share
a host and a fixed port would clash; ``0``: a free port — registered in Consul meta
``metrics_port``, so Prometheus finds it through ``http_sd`` anyway).

Families (``method`` is the full gRPC method, or ``<HTTP method> <path>`` in the gateway;
``code`` the gRPC status name or the HTTP status):

    pdmesh_requests_total{method,code}          finished requests
    pdmesh_request_errors_total{method,code}    those that did not succeed (code != OK / >= 500)
    pdmesh_requests_in_flight{method}           started, not finished
    pdmesh_request_duration_seconds{method}     start to the last byte of the answer
    pdmesh_time_to_first_token_seconds          request start to its first output token
    pdmesh_inter_token_latency_seconds          between output tokens, per token
    pdmesh_output_tokens_total                  tokens streamed out
plus the process_* / python_* collectors. Health checks and reflection are not counted.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdmesh.rpc.errors import status_for

_UNCOUNTED = ("/grpc.health.", "/grpc.reflection.")
# seconds; LLM latencies span ms (a cached decode step) to minutes (a long generation)
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.5, 3, 6, 12, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """A fresh registry by default (not prometheus_client's global one): tests and several
        servers in one process each count their own."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "pdmesh_requests", "Finished requests", ["method", "code"], registry=r
        )
        self.errors = Counter(
            "pdmesh_request_errors", "Requests that failed", ["method", "code"], registry=r
        )
        self.in_flight = Gauge(
            "pdmesh_requests_in_flight", "Requests being served", ["method"], registry=r
        )
        self.duration = Histogram(
            "pdmesh_request_duration_seconds",
            "Request start to the end of its answer",
            ["method"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "pdmesh_time_to_first_token_seconds",
            "Request start to its first output token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        # observed once per token of every stream: plain counts, not prometheus_client's
        # locked metrics (the router's and the gateway's cost per token)
        self.itl = TallyHistogram(
            "pdmesh_inter_token_latency_seconds",
            "Time between output tokens (per token)",
            ITL_BUCKETS,
            registry=r,
        )
        self.output_tokens = TallyCounter(
            "pdmesh_output_tokens", "Output tokens streamed", registry=r
        )
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def observe(self, method: str, code: str, seconds: float, failed: bool) -> None:
        self.requests.labels(method, code).inc()
        if failed:
            self.errors.labels(method, code).inc()
        self.duration.labels(method).observe(seconds)

    def token_timer(self) -> TokenTimer:
        return TokenTimer(self)

    def grpc_interceptor(self) -> grpc.aio.ServerInterceptor:
        return _MetricsInterceptor(self)

    async def endpoint(self, request: Request) -> Response:
        """``/metrics`` as a Starlette/FastAPI endpoint: ``app.add_route("/metrics",
        metrics.endpoint)`` (a route, not a mount, which would redirect to ``/metrics/``)."""
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(self.registry), media_type=content_type)

    def asgi_middleware(self, app: ASGIApp) -> ASGIApp:
        """``app`` with HTTP requests counted (``/metrics`` and ``/health`` excepted)."""
        return _MetricsMiddleware(app, self)


class TokenTimer:
    """Per request: the first ``tokens()`` records TTFT, each later one inter-token latency."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._start = time.perf_counter()
        self._last: float | None = None

    def tokens(self, count: int = 1) -> None:
        """``count`` tokens arrived together (one streamed chunk)."""
        if count <= 0:
            return
        now = time.perf_counter()
        if self._last is None:
            self._metrics.ttft.observe(now - self._start)
        else:
            # a chunk of n tokens after a gap g: n tokens, g/n apart on average
            self._metrics.itl.observe((now - self._last) / count, count)
        self._metrics.output_tokens.inc(count)
        self._last = now


class TallyHistogram:
    """A histogram without labels, kept as plain per-bucket counts and exposed to a scrape as
    a Prometheus histogram (the same samples as prometheus_client's ``Histogram``).
    ``observe`` is a bisect and two additions, where ``Histogram.observe`` takes a lock and
    walks its buckets (~9 us a token in the router on the 2-core machine, with the counter).
    Written on the event loop only; a scrape (the metrics server's thread) copies the counts,
    so at worst it misses an observation being made."""

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry,
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound
        self._sum = 0.0
        registry.register(self)

    def observe(self, value: float, count: int = 1) -> None:
        """``count`` observations of ``value``."""
        self._counts[bisect.bisect_left(self._bounds, value)] += count
        self._sum += value * count

    def describe(self) -> list[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for le, n in zip(self._les, counts, strict=True):
            running += n
            cumulative.append((le, float(running)))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=cumulative, sum_value=total
        )


class TallyCounter:
    """A counter without labels as a plain number, exposed as prometheus_client's ``Counter``
    would be (``<name>_total``); written on the event loop only."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry) -> None:
        self._name = name
        self._documentation = documentation
        self._value = 0.0
        registry.register(self)

    def inc(self, amount: float = 1) -> None:
        self._value += amount

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, value=self._value)


class MetricsServer:
    """The ``/metrics`` HTTP server of a gRPC service (prometheus_client's, in a thread: a
    scrape is answered even while the event loop is busy)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(metrics: Metrics, host: str, port: int) -> MetricsServer | None:
    """Serve ``/metrics`` on ``host:port``; ``port`` -1: don't (returns None), 0: a free one
    (``.port`` says which)."""
    if port < 0:
        return None
    server, thread = start_http_server(port, addr=host, registry=metrics.registry)
    return MetricsServer(server, thread)


class _MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNCOUNTED):
            return handler
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    def _unary(
        self, behavior: Callable[..., Awaitable[Any]], method: str
    ) -> Callable[..., Awaitable[Any]]:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            with _Call(self._metrics, method, context) as call:
                result = await behavior(request, context)
                call.ok = True
                return result

        return unary

    def _stream(
        self, behavior: Callable[..., AsyncIterator[Any]], method: str
    ) -> Callable[..., AsyncIterator[Any]]:
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            with _Call(self._metrics, method, context) as call:
                async for response in behavior(request, context):
                    yield response
                call.ok = True

        return stream


class _Call:
    """One gRPC call being counted; its code is read when it ends."""

    def __init__(self, metrics: Metrics, method: str, context: grpc.aio.ServicerContext) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context
        self.ok = False
        self.start = 0.0

    def __enter__(self) -> _Call:
        self.start = time.perf_counter()
        self.metrics.in_flight.labels(self.method).inc()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        self.metrics.in_flight.labels(self.method).dec()
        code = self._code(exc)
        elapsed = time.perf_counter() - self.start
        self.metrics.observe(self.method, code, elapsed, failed=code != "OK")

    def _code(self, exc: BaseException | None) -> str:
        if exc is None:
            # a handler may set a code without raising; grpc reports it through code()
            code = self.context.code()
            return code.name if isinstance(code, grpc.StatusCode) else "OK"
        if isinstance(exc, grpc.aio.AbortError):
            code = self.context.code()
            return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
        if isinstance(exc, (GeneratorExit, asyncio.CancelledError)):
            return "CANCELLED"  # the client went away (or its deadline passed)
        return status_for(exc).code.name


class _MetricsMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ("/metrics", "/health"):
            await self.app(scope, receive, send)
            return
        method = f"{scope['method']} {scope['path']}"
        status = 500  # what the client sees if the app dies before answering
        start = time.perf_counter()
        self.metrics.in_flight.labels(method).inc()

        async def send_counted(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.in_flight.labels(method).dec()
            elapsed = time.perf_counter() - start
            self.metrics.observe(method, str(status), elapsed, failed=status >= 500)
