"""``ClientStream``: one ``RouterService.Stream`` call — a gateway's many generations over one
long-lived stream.

Each ``generate`` message starts a task that runs the generation exactly as ``Generate`` does
(``RouterServicer.replies``: admission, deadline, retries, migration, metrics). Its replies are
emitted as they are made (most of them by the worker stream's reader, in its pass over each
engine step's message: the task wakes for a request's first output and its end only) and
merged per request into ``_pending`` (text concatenated, ids and logprobs appended), and the
handler's loop sends everything pending in one message whenever the previous write is done: a
gateway that reads slowly gets fewer, larger entries, and no request waits for another
(``coalesce.Coalescer``).

A request ends with its last reply, a status entry (what its own call's status would have
been), a ``cancel`` from the gateway, or the stream ending (the gateway went away): the task is
then cancelled, which cancels its worker calls, and its admission slot is given back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
from opentelemetry.trace import SpanKind

from pdmesh.errors import InvalidRequestError
from pdmesh.rpc.errors import status_for
from pdmesh.rpc.multiplex import MultiplexSession
from pdmesh.telemetry import current_span, start_detached_span
from pdmesh.v1 import common_pb2, router_pb2
from services.router.coalesce import Coalescer
from services.router.upstream import OutgoingCalls, UpstreamError

if TYPE_CHECKING:
    from services.router.server import RouterServicer

log = logging.getLogger(__name__)

# the span a traced request of a Stream gets: what its own Generate call's server span was
SPAN_NAME = "/pdmesh.v1.RouterService/Generate"
SPAN_ATTRIBUTES = {
    "rpc.system": "grpc",
    "rpc.service": "pdmesh.v1.RouterService",
    "rpc.method": "Generate",
}


class ClientStream(MultiplexSession[router_pb2.RouterStreamResponse]):
    def __init__(self, servicer: RouterServicer) -> None:
        self._servicer = servicer
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._pending = Coalescer()
        self._reading = True
        self._draining = False

    def requests_ended(self) -> None:
        self._reading = False
        self._pending.wake()

    def cancel(self, message: router_pb2.RouterStreamRequest) -> None:
        self._cancel(message.tag)

    def start(self, message: router_pb2.RouterStreamRequest) -> None:
        tag = message.tag
        if self._draining:
            self._put(tag, _entry(tag, grpc.StatusCode.UNAVAILABLE, "the router is shutting down"))
            return
        if tag in self._tasks:
            error = InvalidRequestError("tag", f"{tag} is already in use on this stream")
            self._put(tag, _status_entry(tag, error))
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + message.timeout_secs if message.timeout_secs > 0 else None
        task = loop.create_task(self._run(tag, message, deadline))
        self._tasks[tag] = task
        task.add_done_callback(lambda _: self._tasks.pop(tag, None))

    def _cancel(self, tag: int) -> None:
        task = self._tasks.pop(tag, None)
        if task is not None:
            task.cancel()
            self._servicer.count_cancellation()
        self._pending.drop(tag)

    async def _run(
        self, tag: int, message: router_pb2.RouterStreamRequest, deadline: float | None
    ) -> None:
        loop = asyncio.get_running_loop()
        calls = OutgoingCalls()
        ticket = self._servicer.new_ticket()
        span = start_detached_span(
            SPAN_NAME, message.trace_context, SpanKind.SERVER, attributes=SPAN_ATTRIBUTES
        )

        me = asyncio.current_task()
        pending = self._pending

        def remaining() -> float | None:
            return None if deadline is None else deadline - loop.time()

        def emit(reply: router_pb2.RouterGenerateResponse) -> None:
            # from the worker stream's reader: nothing once the request was cancelled (its tag
            # may be in use again by then)
            if self._tasks.get(tag) is me:
                reply.tag = tag
                pending.put(tag, reply)

        try:
            with current_span(span):
                replies = self._servicer.replies(message.generate, remaining, calls, ticket, emit)
                async for reply in replies:
                    emit(reply)
        except asyncio.CancelledError:
            raise
        except UpstreamError as e:
            self._put(tag, _entry(tag, e.code, e.details, e.detail))
        except Exception as e:
            self._put(tag, _status_entry(tag, e))
        finally:
            calls.cancel_all()
            ticket.release()
            if span is not None:
                span.end()

    def _put(self, tag: int, reply: router_pb2.RouterGenerateResponse) -> None:
        self._pending.put(tag, reply)

    async def batches(self) -> AsyncIterator[router_pb2.RouterStreamResponse]:
        """What to send, as it becomes ready; ends once the gateway half-closed the stream and
        its requests are done."""
        while True:
            await self._pending.wait()
            outputs = self._pending.take()
            if outputs:
                yield router_pb2.RouterStreamResponse(outputs=outputs)
            if (not self._reading or self._draining) and not self._tasks and not self._pending:
                return

    def drain(self) -> None:
        """Refuse new requests; end the stream once the open ones are done."""
        self._draining = True
        self._pending.wake()

    def close(self) -> None:
        """The stream ended: cancel every request still running on it."""
        tasks, self._tasks = self._tasks, {}
        for task in tasks.values():
            task.cancel()
        if tasks:
            log.info("a client stream ended with %d requests open; cancelled them", len(tasks))
            for _ in tasks:
                self._servicer.count_cancellation()


def _entry(
    tag: int, code: grpc.StatusCode, message: str, detail: common_pb2.ErrorDetail | None = None
) -> router_pb2.RouterGenerateResponse:
    reply = router_pb2.RouterGenerateResponse(tag=tag)
    reply.status.code = code.value[0]
    reply.status.message = message
    if detail is not None:
        reply.status.detail.CopyFrom(detail)
    return reply


def _status_entry(tag: int, error: BaseException) -> router_pb2.RouterGenerateResponse:
    status = status_for(error)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("stream request %d failed", tag, exc_info=error)
    return _entry(tag, status.code, status.details, status.detail)
