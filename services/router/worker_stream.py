"""``WorkerStream``: the router's one ``WorkerService.Stream`` call to a worker, shared by every
request the router runs there, and ``StreamCall``, one request's view of it.

A ``StreamCall`` reads like the ``Generate`` call it replaces (``read()`` gives the request's
next ``GenerateResponse``, then ``grpc.aio.EOF``; a failure raises ``grpc.aio.AioRpcError``;
``cancel()`` stops it), so retries, breakers, migration and PD pairing treat both alike. Per
engine step the worker sends one message for all of this router's requests there; the reader
task hands each entry to its request. A request that is streaming has a listener on its call
(``listen``: the router's per-request relay, ``relay.Relay``), which the reader calls with
the entry right there, in the same pass over the step's message: detokenized, shaped and handed
to the client's stream without waking the request's task. Without a listener (the request's
first output, a worker without ``Stream``) an entry is queued for ``read()``, which costs a
future resolution and a wake-up of the request's task.

The stream opens on first use and again after it ended: when it breaks (the worker died, its
connection dropped — keepalive pings find a hung one in seconds) every request open on it fails
with the stream's status, exactly as each one's own call would have, so they migrate or retry as
before. A worker that drains ends the stream once its requests are done and refuses new ones
with UNAVAILABLE (they go elsewhere). A worker without ``Stream`` (UNIMPLEMENTED: an older
pdmesh worker during a rolling upgrade, a benchmark's echo worker) gets its open requests
re-sent as ``Generate`` calls, and every later one too, after one warning.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import TypeAlias

import grpc
import grpc.aio

from pdmesh.rpc.errors import ERROR_DETAIL_KEY
from pdmesh.telemetry import trace_carrier
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger(__name__)

_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED

# a request's output as the stream's reader hands it over: (the output, whether it is the last);
# True when the listener took it (nothing is queued for ``read()``)
Listener: TypeAlias = Callable[[worker_pb2.GenerateResponse, bool], bool]

BidiCall: TypeAlias = (
    "grpc.aio.StreamStreamCall[worker_pb2.WorkerStreamRequest, worker_pb2.WorkerStreamResponse]"
)


class StreamCall:
    """One request on a ``WorkerStream``: the parts of a Generate call the router uses."""

    def __init__(
        self,
        stream: WorkerStream,
        request: worker_pb2.GenerateRequest,
        deadline: float,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._stream = stream
        self.request = request
        self.request_id = request.request_id
        self.deadline = deadline  # loop time
        # read() waits once per engine step: asyncio.get_running_loop() each time costs a
        # getpid() syscall (CPython's fork check)
        self._loop = loop
        self._fallback: grpc.aio.UnaryStreamCall | None = None  # the worker has no Stream
        self._outputs: collections.deque[worker_pb2.GenerateResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: grpc.aio.AioRpcError | None = None
        self._ended = False  # its last output (or error) arrived
        self._timer: asyncio.TimerHandle | None = None
        self._listener: Listener | None = None

    def listen(self, listener: Listener | None) -> bool:
        """From now on hand each output to ``listener`` as it arrives (None: stop); outputs
        already queued go to it first, in order. An output it declines (returns False) is
        queued for ``read()`` and wakes the reader; errors and the end come through ``read()``
        as always. False (and nothing set) when the request reads its own Generate call."""
        if self._fallback is not None:
            return False
        self._listener = listener
        outputs = self._outputs
        while listener is not None and outputs:
            output = outputs[0]
            if not listener(output, output.finish_reason != _UNFINISHED):
                break
            outputs.popleft()
        return True

    async def read(self) -> worker_pb2.GenerateResponse | grpc.aio.EOFType:
        while True:
            if self._outputs:
                return self._outputs.popleft()
            if self._fallback is not None:
                reply: worker_pb2.GenerateResponse | grpc.aio.EOFType = await self._fallback.read()
                return reply
            if self._error is not None:
                raise self._error
            if self._ended:
                return grpc.aio.EOF
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def cancel(self) -> bool:
        """Stop the request on the worker (a no-op once it ended); True if it was running."""
        if self._fallback is not None:
            return bool(self._fallback.cancel())
        if self._ended:
            return False
        self._finish(_rpc_error(grpc.StatusCode.CANCELLED, "cancelled by the router"))
        self._stream.cancel(self.request_id)
        return True

    # -- from the stream's reader -----------------------------------------------------------

    def push(self, output: worker_pb2.GenerateResponse) -> None:
        if self._ended:
            return
        if output.HasField("status"):
            self._finish(_status_error(output.status))
            return
        final = output.finish_reason != _UNFINISHED
        listener = self._listener
        if listener is None or not listener(output, final):
            self._outputs.append(output)
        elif not final:
            return  # taken: nothing to wake
        if final:
            if not self._ended:  # (a listener may have cancelled the call)
                self._finish(None)
        else:
            self._wake()  # (_finish wakes too)

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        if not self._ended:
            self._finish(error)

    def fall_back(self, call: grpc.aio.UnaryStreamCall) -> None:
        """Read the request from its own Generate ``call`` from now on (nothing came for it
        on the stream)."""
        if self._timer is not None:
            self._timer.cancel()
        self._fallback = call
        self._listener = None  # the task reads the call itself from now on
        self._wake()

    def expire(self) -> None:
        if not self._ended:
            self._finish(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            self._stream.cancel(self.request_id)

    def _finish(self, error: grpc.aio.AioRpcError | None) -> None:
        self._ended = True
        self._error = error
        if self._timer is not None:
            self._timer.cancel()
        self._stream.forget(self.request_id)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class WorkerStream:
    def __init__(self, stub: worker_pb2_grpc.WorkerServiceStub, label: str) -> None:
        self._stub = stub
        self._label = label
        self._calls: dict[str, StreamCall] = {}
        self._call: BidiCall | None = None
        self._outbox: asyncio.Queue[worker_pb2.WorkerStreamRequest] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self.unsupported = False  # the worker answered UNIMPLEMENTED: use Generate

    def __len__(self) -> int:
        return len(self._calls)

    def open(self, request: worker_pb2.GenerateRequest, timeout: float) -> StreamCall:
        """Start ``request`` on the worker; ``timeout``: seconds it may take (the worker and
        this side both end it with DEADLINE_EXCEEDED past that)."""
        if self._call is None:
            self._connect()
        timeout = max(timeout, 0.001)
        loop = asyncio.get_running_loop()
        call = StreamCall(self, request, loop.time() + timeout, loop)
        self._calls[request.request_id] = call
        call._timer = loop.call_later(timeout, call.expire)
        message = worker_pb2.WorkerStreamRequest(
            generate=request, timeout_secs=timeout, trace_context=trace_carrier()
        )
        self._outbox.put_nowait(message)
        return call

    def cancel(self, request_id: str) -> None:
        if self._call is not None:
            self._outbox.put_nowait(worker_pb2.WorkerStreamRequest(cancel=request_id))

    def forget(self, request_id: str) -> None:
        self._calls.pop(request_id, None)

    def _connect(self) -> None:
        call: BidiCall = self._stub.Stream()
        self._call = call
        self._outbox = asyncio.Queue()
        self._tasks = [
            asyncio.ensure_future(self._write(call, self._outbox)),
            asyncio.ensure_future(self._read(call)),
        ]

    async def _write(
        self, call: BidiCall, outbox: asyncio.Queue[worker_pb2.WorkerStreamRequest]
    ) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(await outbox.get())

    async def _read(self, call: BidiCall) -> None:
        error: grpc.aio.AioRpcError
        try:
            async for message in call:
                for output in message.outputs:
                    target = self._calls.get(output.request_id)
                    if target is not None:
                        target.push(output)
            error = _rpc_error(
                grpc.StatusCode.UNAVAILABLE, f"{self._label} ended its stream (shutting down)"
            )
        except grpc.aio.AioRpcError as e:
            error = e
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                self._fall_back(call)
        except asyncio.CancelledError:
            error = _rpc_error(grpc.StatusCode.UNAVAILABLE, f"stream to {self._label} closed")
            raise
        finally:
            self._disconnected(call, error)

    def _fall_back(self, call: BidiCall) -> None:
        if self._call is not call:
            return
        if not self.unsupported:
            log.warning("%s has no WorkerService.Stream; calling Generate per request", self._label)
        self.unsupported = True
        loop = asyncio.get_running_loop()
        calls, self._calls = self._calls, {}
        for open_call in calls.values():
            left = max(open_call.deadline - loop.time(), 0.001)
            open_call.fall_back(self._stub.Generate(open_call.request, timeout=left))

    def _disconnected(self, call: BidiCall, error: grpc.aio.AioRpcError) -> None:
        if self._call is None or self._call is not call:
            return  # an older stream's end: its requests were failed already
        self._call = None
        for task in self._tasks:
            task.cancel()
        call.cancel()
        calls, self._calls = self._calls, {}
        if calls:
            log.warning(
                "stream to %s ended (%s); failing its %d open requests",
                self._label,
                error.code().name,
                len(calls),
            )
        for open_call in calls.values():
            open_call.fail(error)

    async def close(self) -> None:
        call = self._call
        if call is not None:
            call.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _rpc_error(
    code: grpc.StatusCode, details: str, detail: common_pb2.ErrorDetail | None = None
) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if detail is not None:
        trailing.add(ERROR_DETAIL_KEY, detail.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def _status_error(status: common_pb2.RequestStatus) -> grpc.aio.AioRpcError:
    """A request's in-band status as the error its own call would have raised."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    detail = status.detail if status.HasField("detail") else None
    return _rpc_error(code, status.message, detail)
