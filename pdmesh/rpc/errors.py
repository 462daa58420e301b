"""Exceptions → gRPC status codes, once, at the server boundary.

Handlers just raise (``InvalidRequestError`` for bad input, ...); ``ErrorInterceptor`` turns
whatever escapes a handler into a status, so no servicer repeats try/except:

    InvalidRequestError     → INVALID_ARGUMENT (+ an ErrorDetail naming the field)
    ResourceExhaustedError  → RESOURCE_EXHAUSTED
    RequestNotFoundError    → NOT_FOUND
    EngineDeadError         → UNAVAILABLE (the process cannot serve; callers may go elsewhere)
    PeerUnavailableError    → UNAVAILABLE (a process the request needs is gone)
    FailedPreconditionError → FAILED_PRECONDITION
    DeadlineExceededError   → DEADLINE_EXCEEDED
    AbortedError            → ABORTED
    anything else           → INTERNAL, with the traceback logged

A request message that does not parse (corrupt or truncated bytes, invalid UTF-8 in a string
field) is INVALID_ARGUMENT too: grpc itself would answer UNKNOWN, as for a server fault.

An ``EngineError`` whose ``error_code`` is set (e.g. the router's "queue_timeout") gets an
``ErrorDetail{code}`` too, so a client can tell causes that share a status code apart.
The ``ErrorDetail`` travels in the binary trailing metadata key ``pdmesh-error-detail-bin`` (a
plain-protobuf stand-in for google.rpc.Status details, which would need googleapis protos);
clients read it back with ``error_detail``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from pdmesh.errors import (
    AbortedError,
    DeadlineExceededError,
    EngineDeadError,
    EngineError,
    FailedPreconditionError,
    InvalidRequestError,
    PeerUnavailableError,
    RequestNotFoundError,
    ResourceExhaustedError,
)
from pdmesh.v1 import common_pb2

log = logging.getLogger(__name__)

ERROR_DETAIL_KEY = "pdmesh-error-detail-bin"


@dataclass(frozen=True)
class RpcStatus:
    code: grpc.StatusCode
    details: str
    detail: common_pb2.ErrorDetail | None = None


def status_for(exc: BaseException) -> RpcStatus:
    """The status an exception escaping a handler becomes; an ``EngineError`` with an
    ``error_code`` carries it in an ``ErrorDetail``."""
    status = _status_for(exc)
    code = exc.error_code if isinstance(exc, EngineError) else ""
    if code and status.detail is None:
        return dataclasses.replace(status, detail=common_pb2.ErrorDetail(code=code))
    return status


def _status_for(exc: BaseException) -> RpcStatus:
    if isinstance(exc, InvalidRequestError):
        detail = common_pb2.ErrorDetail(field=exc.field, reason=exc.message)
        return RpcStatus(grpc.StatusCode.INVALID_ARGUMENT, str(exc), detail)
    if isinstance(exc, ResourceExhaustedError):
        return RpcStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if isinstance(exc, RequestNotFoundError):
        return RpcStatus(grpc.StatusCode.NOT_FOUND, str(exc))
    if isinstance(exc, (EngineDeadError, PeerUnavailableError)):
        return RpcStatus(grpc.StatusCode.UNAVAILABLE, str(exc))
    if isinstance(exc, FailedPreconditionError):
        return RpcStatus(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    if isinstance(exc, DeadlineExceededError):
        return RpcStatus(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
    if isinstance(exc, AbortedError):
        return RpcStatus(grpc.StatusCode.ABORTED, str(exc))
    return RpcStatus(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


async def abort_with(exc: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """End the call with the status for ``exc`` (raises grpc.aio.AbortError, as abort does)."""
    status = status_for(exc)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("%s failed", method, exc_info=exc)
    else:
        log.info("%s: %s %s", method, status.code.name, status.details)
    if status.detail is not None:
        context.set_trailing_metadata(((ERROR_DETAIL_KEY, status.detail.SerializeToString()),))
    await context.abort(status.code, status.details)


def error_detail(error: grpc.RpcError) -> common_pb2.ErrorDetail | None:
    """Client side: the ErrorDetail a pdmesh server attached to a failed call, if any."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == ERROR_DETAIL_KEY and isinstance(value, bytes):
            return common_pb2.ErrorDetail.FromString(value)
    return None


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every async handler so an exception becomes a status instead of UNKNOWN."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: grpc answers UNIMPLEMENTED
            return handler
        method = handler_call_details.method
        kinds = (
            ("unary_unary", grpc.unary_unary_rpc_method_handler),
            ("unary_stream", grpc.unary_stream_rpc_method_handler),
            ("stream_unary", grpc.stream_unary_rpc_method_handler),
            ("stream_stream", grpc.stream_stream_rpc_method_handler),
        )
        for kind, make in kinds:
            behavior = getattr(handler, kind)
            if behavior is None:
                continue
            wrapped = _wrap(behavior, method)
            if wrapped is None:
                return handler
            decode = _decoder(handler.request_deserializer, streaming=kind.startswith("stream"))
            return make(wrapped, decode, handler.response_serializer)
        return handler


Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]
Deserializer = Callable[[bytes], Any]


@dataclass(frozen=True)
class _Undecodable:
    """Stands in for a unary request that did not parse; the wrapped handler raises ``error``."""

    error: InvalidRequestError


def _decoder(deserialize: Deserializer | None, streaming: bool) -> Deserializer | None:
    """``deserialize`` with parse failures turned into ``InvalidRequestError``.

    grpc parses a unary request before any handler runs and answers UNKNOWN when that raises,
    so there the error travels as an ``_Undecodable`` the wrapped handler raises. A streamed
    request's messages are parsed as the handler reads them: the error is raised there.
    """
    if deserialize is None:
        return None

    def decode(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError as e:
            error = InvalidRequestError("request", f"is not a valid protobuf message: {e}")
            if streaming:
                raise error from e
            return _Undecodable(error)

    return decode


def _wrap(behavior: Behavior, method: str) -> Behavior | None:
    """``behavior`` with exceptions mapped; None for sync handlers (the generated
    UNIMPLEMENTED stubs), which are left alone."""
    if inspect.isasyncgenfunction(behavior):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                if isinstance(request, _Undecodable):
                    raise request.error
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:  # the handler chose its own status
                raise
            except Exception as e:
                await abort_with(e, context, method)

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                if isinstance(request, _Undecodable):
                    raise request.error
                return await behavior(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await abort_with(e, context, method)

        return unary
    return None
