"""``Output`` and ``Inbox``: where the router's output for one HTTP request waits for the task
that answers it.

The router side (the reader of a shared ``Stream`` call, or the task of a per-request
``Generate`` call) ``add``s each entry to its request's ``Output`` as it arrives and never
waits for the HTTP side: one slow client cannot hold up the other requests on the same stream.
The HTTP side iterates the ``Inbox`` of all its choices and gets, per step, everything one
choice produced since it last looked, merged into one ``Piece``. A client that reads slower than
tokens come thus gets fewer, bigger SSE chunks, never a backlog of one-token messages.

Closing the inbox (the client went away, another choice failed, the answer is complete) stops
every request still running through its ``cancel``; so does dropping it unclosed (Starlette can
cancel a response before its body started), through a finalizer.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from collections.abc import Callable

import grpc.aio

from pdmesh.v1 import common_pb2, router_pb2
from services.gateway import convert
from services.gateway.generation import GenerationError, Piece

_FINISH_ERROR = common_pb2.FINISH_REASON_ERROR
_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED


class Output:
    """One router request (one choice): what it produced that was not taken yet, and how to
    stop it. The router side sets ``cancel``, ``on_error``, ``deadline``, ``timer`` (and
    ``on_final``) when it starts it."""

    __slots__ = (
        "index",
        "request",
        "received",
        "final",
        "done",
        "error",
        "cancel",
        "on_error",
        "deadline",
        "timer",
        "on_final",
        "_entries",
        "_queued",
        "_inbox",
    )

    def __init__(self, index: int, request: router_pb2.RouterGenerateRequest, inbox: Inbox) -> None:
        self.index = index
        self.request = request
        self.received = False  # an entry came: the request may not move to another router
        self.final = False  # its last entry came (or it failed): nothing more will
        self.done = False  # the HTTP side is done with it: taken to the end, failed or closed
        self.error: BaseException | None = None
        # set by whoever runs it: stop it there (a Stream cancel, a call's cancel)
        self.cancel: Callable[[], None] | None = None
        # set by whoever runs it: what a failure of the router call does (the client may
        # start it again on another router, or ``fail`` it)
        self.on_error: Callable[[grpc.aio.AioRpcError], None] = self.fail
        self.deadline = 0.0  # when it must have ended (the event loop's clock)
        self.timer: asyncio.TimerHandle | None = None  # fails it at its deadline
        # called once when nothing more comes, with its error if it failed (its trace span)
        self.on_final: Callable[[BaseException | None], None] | None = None
        self._entries: list[router_pb2.RouterGenerateResponse] = []
        self._queued = False
        # weak: an inbox the HTTP side dropped must be collectable, so its finalizer runs
        self._inbox = weakref.ref(inbox)

    def add(self, entry: router_pb2.RouterGenerateResponse) -> None:
        """An entry from the router (the router side's only per-token call)."""
        if self.final:
            return
        self.received = True
        if entry.finish_reason == _FINISH_ERROR:  # an in-band failure
            self.fail(GenerationError(entry.error if entry.HasField("error") else "failed"))
            return
        if entry.finish_reason != _UNFINISHED:
            self._finalize(None)
        self._entries.append(entry)
        self._notify()

    def end(self) -> None:
        """The router side ended it without a last entry (a Generate call that just ended)."""
        if not self.final:
            self._finalize(None)
            self._notify()

    def fail(self, error: BaseException) -> None:
        """It failed; what it produced before still comes first."""
        if self.final:
            return
        self.error = error
        self._finalize(error)
        self._notify()

    def stop(self) -> None:
        """The HTTP side is done with it: stop it where it still runs."""
        if self.done:
            return
        self.done = True
        if not self.final:
            if self.cancel is not None:
                self.cancel()
            self._finalize(None)

    def moved(self, error: BaseException) -> None:
        """The router side gave up on one router for another: what waits for the end of the
        attempt (its trace span) ends with ``error``; the request goes on."""
        if self.on_final is not None:
            on_final, self.on_final = self.on_final, None
            on_final(error)

    def take(self) -> Piece | None:
        """Everything pending, merged into one piece (None when nothing is)."""
        entries = self._entries
        if not entries:
            return None
        self._entries = []
        return convert.piece_from_pbs(self.index, entries)

    @property
    def pending(self) -> bool:
        return bool(self._entries)

    def _finalize(self, error: BaseException | None) -> None:
        """Nothing more comes: stop its timer, tell whoever waits for its end."""
        self.final = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.on_final is not None:
            on_final, self.on_final = self.on_final, None
            on_final(error)

    def _notify(self) -> None:
        if not self._queued:
            inbox = self._inbox()
            if inbox is not None:
                self._queued = True
                inbox._ready_output(self)


class Inbox:
    """The outputs of one HTTP request's router requests (``outputs[i]`` is choice i), read as
    one async iterator of all choices' ``Piece``s in arrival order. The first error of any
    output is raised there (after the pieces that output produced before it)."""

    def __init__(self, requests: list[router_pb2.RouterGenerateRequest]) -> None:
        self.outputs = [Output(i, r, self) for i, r in enumerate(requests)]
        self._ready: deque[Output] = deque()  # outputs with something to take, oldest first
        self._unfinished = len(self.outputs)
        self._waiter: asyncio.Future[None] | None = None
        # an inbox dropped without aclose (a response cancelled before its body ran) still
        # stops its requests; it must not reference the inbox itself
        self._finalizer = weakref.finalize(self, _stop_all, self.outputs)

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Piece:
        while True:
            if not self._ready:
                if not self._unfinished:
                    raise StopAsyncIteration
                await self._wait()
                continue
            output = self._ready.popleft()
            output._queued = False
            piece = output.take()
            if piece is not None:
                if output.error is not None:  # its error comes after what it produced
                    output._queued = True
                    self._ready.appendleft(output)
                elif output.final:
                    self._finish(output)
                return piece
            if output.error is not None:
                self._finish(output)
                raise output.error
            if output.final:
                self._finish(output)

    async def peek(self) -> None:
        """Wait until the first piece is in, without taking it; raise the error that came
        first instead, if one did (so a request the router refused gets its HTTP status)."""
        while not self._ready and self._unfinished:
            await self._wait()
        if self._ready and not self._ready[0].pending and self._ready[0].error is not None:
            raise self._ready[0].error

    async def aclose(self) -> None:
        """Stop every request still running (idempotent)."""
        self.close()

    def close(self) -> None:
        self._finalizer()

    def _ready_output(self, output: Output) -> None:
        self._ready.append(output)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _finish(self, output: Output) -> None:
        if not output.done:
            output.done = True
            self._unfinished -= 1


def _stop_all(outputs: list[Output]) -> None:
    for output in outputs:
        output.stop()
