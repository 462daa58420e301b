"""``RouterStream``: the one ``RouterService.Stream`` call a gateway process keeps open to a
router, shared by all of its requests there.

Each request gets a tag, unique on the stream; starting and cancelling one is one message each,
put on an outbox that grpc writes from in order, so both can be done from synchronous code
(``Inbox.close`` cancels). One reader task demultiplexes every ``RouterStreamResponse`` entry
to its request's ``Output`` by tag; ``Output.add`` never waits for the HTTP side, so one slow
client cannot hold up the others.

The call is opened by the first request and again by the first request after it ended. When it
ends — the router went away, the connection broke — every request still open on it gets
UNAVAILABLE naming the router (what its broken Generate call would have raised) through its
``on_error``, which moves one that received nothing to the next router. A router without
``Stream`` (an older pdmesh) answers UNIMPLEMENTED: ``on_unimplemented`` gets the requests that
were open, none of which ran there.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
import grpc.aio
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from pdmesh.telemetry.propagation import RPC_GRPC_STATUS_CODE
from pdmesh.telemetry.tracing import TRACER_NAME
from pdmesh.v1 import router_pb2, router_pb2_grpc
from services.gateway.inbox import Output
from services.gateway.router_errors import status_error, unavailable

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.25  # how often a removed router's stream is checked for open requests
# how long the first write of a router's first Stream call waits for the router's headers
# (a router without Stream answers UNIMPLEMENTED within a round trip)
PROBE_S = 0.5
# a request's span at the gateway, named as the tracing interceptor named its Generate call
CLIENT_SPAN = "/pdmesh.v1.RouterService/Generate"

_tracer = trace.get_tracer(TRACER_NAME)


class RouterStream:
    def __init__(
        self,
        address: str,
        channel: grpc.aio.Channel,
        on_unimplemented: Callable[[list[Output]], None],
    ) -> None:
        self.address = address
        self._stub = router_pb2_grpc.RouterServiceStub(channel)
        self._on_unimplemented = on_unimplemented
        self._session: _Session | None = None
        self._tags = itertools.count(1)  # never reused, also across sessions
        self.confirmed = False  # the router answered a Stream call: it implements Stream

    @property
    def open_requests(self) -> int:
        return len(self._session.open) if self._session is not None else 0

    def start(self, output: Output, timeout: float, trace_context: Mapping[str, str]) -> None:
        session = self._session
        if session is None or session.ended:
            session = self._session = _Session(self, self._stub)
            log.info("opened a Stream call to router %s", self.address)
        tag = next(self._tags)
        session.open[tag] = output
        output.cancel = lambda: session.cancel(tag)
        session.send(
            router_pb2.RouterStreamRequest(
                tag=tag,
                generate=output.request,
                timeout_secs=timeout,
                trace_context=_client_span(output, trace_context, self.address),
            )
        )

    async def drain(self, timeout: float) -> None:
        """Wait until no request is open on the stream (at most ``timeout``), then close it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.open_requests and loop.time() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        await self.close()

    async def close(self) -> None:
        """End the call; requests still open on it fail (the router aborts them)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()


class _Session:
    """One ``Stream`` call: its open requests by tag, its outbox and its reader."""

    def __init__(self, stream: RouterStream, stub: router_pb2_grpc.RouterServiceStub) -> None:
        self.open: dict[int, Output] = {}
        self.ended = False
        self._stream = stream
        self._closing = False
        self._outbox: asyncio.Queue[router_pb2.RouterStreamRequest] = asyncio.Queue()
        # the call and its reader outlive the request that opens them: they run in a context
        # of their own, not in that request's (its trace span, its cancellation)
        context = contextvars.Context()
        self._call = context.run(stub.Stream, self._requests())
        loop = asyncio.get_running_loop()
        name = f"router stream {stream.address}"
        self._reader = loop.create_task(self._read(), name=name, context=context)

    def send(self, message: router_pb2.RouterStreamRequest) -> None:
        self._outbox.put_nowait(message)

    def cancel(self, tag: int) -> None:
        # unknown to the router once it sent the last entry: it ignores the cancel then
        if self.open.pop(tag, None) is not None and not self.ended:
            self.send(router_pb2.RouterStreamRequest(tag=tag, cancel=True))

    async def close(self) -> None:
        self._closing = True
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _requests(self) -> AsyncIterator[router_pb2.RouterStreamRequest]:
        yield await self._outbox.get()
        if not self._stream.confirmed:
            # A router without Stream ends the call at once with UNIMPLEMENTED, but grpc.aio
            # reports a write that races that end as INTERNAL ("Internal error from Core"),
            # hiding the status the fallback to Generate needs. So until the router showed it
            # has Stream (its headers came and the call runs on), the first write waits for
            # them a little; a router that sends its headers only with its first output costs
            # the requests behind the first one up to PROBE_S, once.
            headers = asyncio.ensure_future(self._call.initial_metadata())
            headers.add_done_callback(_consume)
            await asyncio.wait((headers,), timeout=PROBE_S)
            if self._call.done():
                return
            if headers.done():
                self._stream.confirmed = True
        while True:
            yield await self._outbox.get()

    async def _read(self) -> None:
        address = self._stream.address
        why = "the router ended the stream"
        code = grpc.StatusCode.OK
        try:
            async for response in self._call:
                self._stream.confirmed = True
                self._deliver(response)
        except grpc.aio.AioRpcError as e:
            code = e.code()
            why = f"the stream broke: {code.name}: {e.details()}"
        except asyncio.CancelledError:
            why = "the gateway closed its stream"
        except Exception:  # a bug here must not leave requests waiting for their deadline
            log.exception("reading the stream from router %s failed", address)
            why = "the gateway failed reading its stream"
        finally:
            self.ended = True
            open_, self.open = list(self.open.values()), {}
            if code == grpc.StatusCode.UNIMPLEMENTED and not self._closing:
                self._stream._on_unimplemented(open_)
            else:
                if self._closing:
                    why = "the gateway closed its stream (router removed, or shutting down)"
                if open_ and not self._closing:
                    log.warning("router %s: %s (%d requests open)", address, why, len(open_))
                for output in open_:
                    output.on_error(unavailable(address, why))

    def _deliver(self, response: router_pb2.RouterStreamResponse) -> None:
        open_ = self.open
        for entry in response.outputs:
            output = open_.get(entry.tag)
            if output is None:  # cancelled meanwhile
                continue
            if entry.finish_reason:
                del open_[entry.tag]
            elif entry.HasField("status"):
                del open_[entry.tag]
                output.on_error(status_error(entry.status))
                continue
            output.add(entry)


def _consume(future: asyncio.Future[object]) -> None:
    # a probe nobody awaits any more: its failure (the call ended) is no news
    if not future.cancelled():
        future.exception()


def _client_span(output: Output, parent: Mapping[str, str], address: str) -> Mapping[str, str]:
    """A CLIENT span of the request's own under ``parent`` (the HTTP request's), ended with
    the request: what the channel's tracing interceptor made for its Generate call, so the
    trace keeps its shape. Returns the trace context the router continues; nothing while
    tracing is off (``parent`` is empty then)."""
    if not parent:
        return parent
    span = _tracer.start_span(
        CLIENT_SPAN,
        context=propagate.extract(dict(parent)),
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "grpc", "rpc.method": "Generate", "server.address": address},
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))

    def end(error: BaseException | None) -> None:
        if isinstance(error, grpc.aio.AioRpcError):
            span.set_attribute(RPC_GRPC_STATUS_CODE, error.code().value[0])
            span.set_status(Status(StatusCode.ERROR, error.details()))
        elif error is not None:
            span.set_status(Status(StatusCode.ERROR, str(error)))
        span.end()

    output.on_final = end
    return carrier
