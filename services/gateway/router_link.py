"""``RouterLink``: one router as the gateway reaches it — its channel, and how a request is run
there: on the shared ``Stream`` call (``RouterStream``), or as a ``Generate`` call of its own
(``--no-router-stream``, or a router that answered UNIMPLEMENTED for ``Stream``: an older pdmesh).

Either way the request's entries go to its ``Output`` as they come and a failure of the call
goes to its ``on_error``, so the client above does not care which.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Mapping

import grpc
import grpc.aio

from pdmesh.rpc import keepalive
from pdmesh.rpc.tls import TLSConfig
from pdmesh.telemetry import client_interceptors
from pdmesh.telemetry.tracing import tracing_installed
from pdmesh.v1 import router_pb2_grpc
from services.gateway.inbox import Output
from services.gateway.router_errors import rpc_error
from services.gateway.router_stream import RouterStream

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # one connection carries every request of this process to the router: a router that
    # hangs (SIGSTOP, a wedged host) must fail them in seconds, not at their deadline
    *keepalive.CLIENT_OPTIONS,
)
# a request whose deadline is (all but) gone still goes out, to fail there with the router's
# own DEADLINE_EXCEEDED (a timeout of 0 would mean the router's default on a Stream)
MIN_TIMEOUT_S = 0.001


class RouterLink:
    def __init__(self, address: str, tls: TLSConfig, use_stream: bool) -> None:
        self.address = address
        self.channel = tls.channel(
            address, options=CHANNEL_OPTIONS, interceptors=client_interceptors()
        )
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)
        self.stream: RouterStream | None = None
        self._stream_channel: grpc.aio.Channel | None = None
        if use_stream:
            # the Stream call outlives every request on it: a per-call tracing interceptor
            # would make it one span across all of them, so it gets a channel without; each
            # request carries its own trace context in its start message instead
            self._stream_channel = (
                tls.channel(address, options=CHANNEL_OPTIONS)
                if tracing_installed()
                else self.channel
            )
            self.stream = RouterStream(address, self._stream_channel, self._fall_back)
        self._calls: set[asyncio.Task[None]] = set()
        self.closed = False  # removed, or the gateway is stopping: no new requests

    def start(
        self, output: Output, trace_context: Mapping[str, str], context: contextvars.Context
    ) -> None:
        """Run ``output.request`` here until ``output.deadline``. ``context``: the HTTP
        request's (its trace span), for a Generate call's task."""
        timeout = max(output.deadline - asyncio.get_running_loop().time(), MIN_TIMEOUT_S)
        if self.stream is not None:
            self.stream.start(output, timeout, trace_context)
            return
        task = asyncio.get_running_loop().create_task(
            self._generate(output, timeout), context=context
        )
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

        def cancel() -> None:
            task.cancel()

        output.cancel = cancel

    @property
    def open_requests(self) -> int:
        return len(self._calls) + (self.stream.open_requests if self.stream else 0)

    async def _generate(self, output: Output, timeout: float) -> None:
        call = self.stub.Generate(output.request, timeout=timeout)
        try:
            async for message in call:
                output.add(message)
        except grpc.aio.AioRpcError as e:
            output.on_error(e)
        else:
            output.end()
        finally:
            call.cancel()  # a no-op once it ended; else the HTTP side left: stop the router

    def _fall_back(self, waiting: list[Output]) -> None:
        """The router has no Stream: run its requests as Generate calls from now on."""
        if self.stream is not None:
            log.warning(
                "router %s does not implement RouterService.Stream (an older pdmesh?): "
                "sending it one Generate call per request instead",
                self.address,
            )
            self.stream = None
        unimplemented = rpc_error(grpc.StatusCode.UNIMPLEMENTED, "no RouterService.Stream")
        for output in waiting:
            output.moved(unimplemented)
            # the HTTP requests' trace contexts stay behind in their tasks: these few calls
            # are traced without a parent
            self.start(output, {}, contextvars.Context())

    async def close(self, grace: float | None = None) -> None:
        """Stop sending here; open requests get ``grace`` seconds to end (None: none)."""
        self.closed = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (grace or 0.0)
        if self.stream is not None:
            if grace:
                await self.stream.drain(grace)
            else:
                await self.stream.close()
        # Generate calls (a router without Stream) get what is left of the grace
        await self.channel.close(grace=max(deadline - loop.time(), 0.0) if grace else None)
        if self._stream_channel is not None and self._stream_channel is not self.channel:
            await self._stream_channel.close()
