"""``LiveCalls``: the Generate calls a worker is serving, by request id, and what to do when one
ends before its request finished.

NOTE on cancellation: a Generate call can end three ways — its last output, an exception, or the
client going away (cancel, deadline, disconnect). grpc may cancel the call while the handler is
parked at a ``yield``, and then nothing closes the handler (and the engine stream inside it)
until the garbage collector does. So each call registers a done-callback that runs its
``on_cancel`` if the handler had not closed: the pages are freed as soon as grpc notices.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc.aio

from pdmesh.errors import InvalidRequestError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Call:
    """One Generate call's claim on its request id (identity matters: ids can be reused)."""

    request_id: str
    on_cancel: Callable[[], object]  # stops the request wherever it is; must not block
    # the handler's stream was closed (its last output, an error, or a cancel that reached it):
    # the handler has then already stopped the request if it had to
    closed: bool = False


class LiveCalls:
    def __init__(self) -> None:
        self._calls: dict[str, Call] = {}

    def __len__(self) -> int:
        return len(self._calls)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._calls

    def claim(
        self, request_id: str, context: grpc.aio.ServicerContext, on_cancel: Callable[[], object]
    ) -> Call:
        """Register the call serving ``request_id``; ``on_cancel`` runs if it ends unclosed."""
        # checked here, not only in the engine: AsyncEngine keys its output queues by id, so a
        # duplicate reaching it would steal the live request's stream before being rejected
        if request_id in self._calls:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        call = Call(request_id, on_cancel)
        self._calls[request_id] = call
        context.add_done_callback(lambda _: self._done(call))
        return call

    def _done(self, call: Call) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]
        if not call.closed:
            log.info(
                "request %r ended before finishing (client went away); aborting", call.request_id
            )
            call.on_cancel()
