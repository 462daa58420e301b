"""What the router does with the calls it makes to other services.

``UpstreamError``: a call to a worker or the tokenizer failed. The router answers its own
client with the same status code and message (and the same ``ErrorDetail``), so a bad
``top_p`` reads the same whether the worker is called directly or through the router. Failures
of the other service itself (UNAVAILABLE, DEADLINE_EXCEEDED, ...) get the service's name put in
front, since the client cannot tell which of the router's upstreams failed otherwise.

``OutgoingCalls``: the calls one client request has open, all cancelled when that request ends
however it ends (client cancel, deadline, error) — cancelling a worker's Generate aborts the
request there and frees its pages.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NoReturn, Protocol, TypeVar

import grpc
import grpc.aio

from pdmesh.rpc.errors import ERROR_DETAIL_KEY, error_detail
from pdmesh.v1 import common_pb2

# the caller's own mistakes: passed through word for word
_CALLER_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)


class Cancellable(Protocol):
    """A call the router made: a grpc call, or a request on a shared worker stream."""

    def cancel(self) -> bool: ...


CallT = TypeVar("CallT", bound=Cancellable)


class UpstreamError(Exception):
    def __init__(
        self, code: grpc.StatusCode, details: str, detail: common_pb2.ErrorDetail | None = None
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.detail = detail

    @classmethod
    def from_rpc(cls, service: str, error: grpc.aio.AioRpcError) -> UpstreamError:
        """``service`` names the callee for messages, e.g. "worker w1 (127.0.0.1:50053)"."""
        code, details = error.code(), error.details() or ""
        if code in _CALLER_CODES:
            return cls(code, details, error_detail(error))
        if code == grpc.StatusCode.CANCELLED:
            # our own client's cancel never gets here (the handler is cancelled first): the
            # callee gave up on the call, e.g. it shut down past its grace period
            code = grpc.StatusCode.UNAVAILABLE
        return cls(code, f"{service} failed with {error.code().name}: {details}")

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        if self.detail is not None:
            context.set_trailing_metadata(((ERROR_DETAIL_KEY, self.detail.SerializeToString()),))
        await context.abort(self.code, self.details)
        raise AssertionError("unreachable: context.abort raises")


@contextlib.contextmanager
def calling(service: str) -> Iterator[None]:
    """Turn a failed grpc call made inside the block into an ``UpstreamError`` naming
    ``service``."""
    try:
        yield
    except grpc.aio.AioRpcError as e:
        raise UpstreamError.from_rpc(service, e) from e


class OutgoingCalls:
    def __init__(self) -> None:
        self._calls: list[Cancellable] = []
        self._on_next: Callable[[], None] | None = None

    def track(self, call: CallT) -> CallT:
        """Remember ``call``; returns it for chaining."""
        self._calls.append(call)
        if self._on_next is not None:
            on_next, self._on_next = self._on_next, None
            on_next()
        return call

    def on_next_track(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once, when the next call is tracked (the router times its own
        work up to the moment the worker call is issued)."""
        self._on_next = callback

    def forget(self, call: Cancellable) -> None:
        """Stop tracking ``call`` (its last message arrived): ``cancel_all`` then leaves it to
        end by itself, rather than cancelling a call whose worker may still be closing it."""
        with contextlib.suppress(ValueError):
            self._calls.remove(call)

    def cancel_all(self) -> None:
        # cancelling a finished call is a no-op, so there is no need to forget finished ones
        for call in self._calls:
            call.cancel()
        self._calls.clear()
