"""Trace context across process boundaries: W3C ``traceparent``/``tracestate`` in gRPC metadata
and HTTP headers.

gRPC (both return ``[]`` while tracing is off, so the channel/server pays nothing):

    rpc = RpcServer([SERVICE_NAME], interceptors=server_interceptors())
    channel = grpc.aio.insecure_channel(address, interceptors=client_interceptors())

HTTP (the gateway): ``TracingMiddleware`` wraps the ASGI app; it continues the caller's trace
from the request headers and makes the request span current, so the router calls made while
answering carry it on through ``client_interceptors``. ``inject_metadata`` is for a call made
on a channel without the interceptors.

Health checks and reflection are not traced: Consul polls health every few seconds.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import negate, service_prefix
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pdmesh.rpc.errors import status_for
from pdmesh.telemetry.tracing import TRACER_NAME, tracing_installed

RPC_GRPC_STATUS_CODE = "rpc.grpc.status_code"
_UNTRACED = ("grpc.health.", "grpc.reflection.")
UNTRACED_PATHS = frozenset({"/health", "/metrics"})


def _traced(details: Any) -> bool:
    return all(negate(service_prefix(p))(details) for p in _UNTRACED)


def server_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """Interceptors that continue the caller's trace in a SERVER span per call. Pass them to
    ``RpcServer(..., interceptors=...)``; ``tracer_provider``: for tests, else the global one."""
    if tracer_provider is None and not tracing_installed():
        return []
    # the status interceptor runs inside the OTel one, so its span is current there
    return [aio_server_interceptor(tracer_provider, filter_=_traced), _SpanStatusInterceptor()]


def client_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that open a CLIENT span per call and put its context in the metadata."""
    if tracer_provider is None and not tracing_installed():
        return []
    interceptors: list[grpc.aio.ClientInterceptor] = aio_client_interceptors(
        tracer_provider, filter_=_traced
    )
    return interceptors


def inject_metadata(
    metadata: Sequence[tuple[str, str | bytes]] = (),
) -> list[tuple[str, str | bytes]]:
    """``metadata`` plus the current trace context (for calls on uninstrumented channels)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [*metadata, *carrier.items()]


def extract_headers(headers: Mapping[str, str]) -> Any:
    """The OTel context a request's headers carry (``traceparent``…), for ``start_span``."""
    return propagate.extract({k.lower(): v for k, v in headers.items()})


class _SpanStatusInterceptor(grpc.aio.ServerInterceptor):
    """Marks the call's span as an error with the gRPC code an escaping exception will get.

    pdmesh's ErrorInterceptor maps exceptions to codes *outside* every other interceptor, so the
    OTel span would otherwise only see a raw exception and no status."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or not _traced(handler_call_details):
            return handler
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler  # client-streaming calls: pdmesh has none; left as they are


def _mark(exc: BaseException) -> None:
    if isinstance(exc, grpc.aio.AbortError):
        return  # the handler aborted through its (OTel-wrapped) context: already recorded
    status = status_for(exc)
    current = trace.get_current_span()
    current.set_attribute(RPC_GRPC_STATUS_CODE, status.code.value[0])
    current.set_status(Status(StatusCode.ERROR, f"{status.code.name}: {status.details}"))


def _unary(behavior: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except Exception as e:
            _mark(e)
            raise

    return unary


def _stream(behavior: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except Exception as e:
            _mark(e)
            raise

    return stream


class TracingMiddleware:
    """Pure-ASGI: one SERVER span per HTTP request, continuing the caller's W3C context.

    Pure ASGI (not BaseHTTPMiddleware) so a streamed response runs inside the span and the
    span ends when the last byte is sent (or the client goes away)."""

    def __init__(
        self,
        app: ASGIApp,
        tracer_provider: trace.TracerProvider | None = None,
        untraced_paths: frozenset[str] = UNTRACED_PATHS,
    ) -> None:
        """``untraced_paths``: probes (Consul's HTTP check, Prometheus' scrapes) that would
        otherwise add a root span every few seconds."""
        self.app = app
        self._provider = tracer_provider
        self._untraced = untraced_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] in self._untraced
            or (self._provider is None and not tracing_installed())
        ):
            await self.app(scope, receive, send)
            return
        tracer = trace.get_tracer(TRACER_NAME, tracer_provider=self._provider)
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        attributes = {"http.request.method": method, "url.path": path, "url.scheme": "http"}
        if user_agent := headers.get("user-agent"):
            attributes["user_agent.original"] = user_agent
        with tracer.start_as_current_span(
            f"{method} {path}",
            context=extract_headers(dict(headers.items())),
            kind=SpanKind.SERVER,
            attributes=attributes,
        ) as current:

            async def send_traced(message: Message) -> None:
                if message["type"] == "http.response.start":
                    code = int(message["status"])
                    current.set_attribute("http.response.status_code", code)
                    if code >= 500:
                        current.set_status(Status(StatusCode.ERROR, f"HTTP {code}"))
                await send(message)

            await self.app(scope, receive, send_traced)
