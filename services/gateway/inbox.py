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

Direct writes: a streamed chat or completions answer without logprobs (``write_directly``)
lets the router side write a plain content entry — text only, not the last — as its SSE chunk
itself, through the response's ASGI ``send``, whenever the HTTP task is parked waiting here
with nothing pending (it would otherwise be woken for exactly that one chunk: one task wake-up,
the generators above it, a ``Piece`` and the chunk's dict per token). The chunk's bytes are
those the HTTP side would have sent (``direct_event`` is its own template), in the same order.
``send`` returns without waiting unless the client's socket is full: then the rest of that send
runs as a task, everything after it queues here as before (merged for the slow reader), and the
HTTP side waits for that send before it writes anything. A failed send reaches the HTTP side
as ``DirectSendFailed``, which the response turns back into the error itself.
"""

from __future__ import annotations

import asyncio
import types
import weakref
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import grpc.aio

from pdmesh.v1 import common_pb2, router_pb2
from services.gateway import convert
from services.gateway.generation import GenerationError, Piece

_FINISH_ERROR = common_pb2.FINISH_REASON_ERROR
_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED

Send = Callable[[dict[str, Any]], Any]  # the response's ASGI send
ContentEvent = Callable[[int, str], bytes]  # (choice index, text) -> the chunk's SSE bytes


class DirectSendFailed(BaseException):
    """A direct write's ``send`` raised ``error``. A BaseException, so the event generators
    between the inbox and the response (which turn an ``Exception`` into an error event) let it
    through; the response raises ``error`` itself, as a failed ``send`` of its own would."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(error)
        self.error = error


class Output:
    """One router request (one choice): what it produced that was not taken yet, and how to
    stop it. The router side sets ``cancel``, ``on_error``, ``deadline``, ``timer`` (and
    ``on_final``) when it starts it."""

    __slots__ = (
        "index",
        "request",
        "received",
        "token_ids",
        "resumes",
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
        self.received = False  # an entry came: another router must resume, not restart it
        # the completion tokens received, over every router it ran on (what a resume sends)
        self.token_ids: list[int] = []
        self.resumes = 0  # how many times it moved to another router mid-stream
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
        self.token_ids += entry.token_ids
        reason = entry.finish_reason
        if reason == _FINISH_ERROR:  # an in-band failure
            self.fail(GenerationError(entry.error if entry.HasField("error") else "failed"))
            return
        if reason != _UNFINISHED:
            self._finalize(None)
        elif not self._entries:
            inbox = self._inbox()
            if inbox is not None and inbox._send is not None and inbox._write(self.index, entry):
                return
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
        # the loop of the task that reads it, kept: asyncio.get_running_loop() costs a getpid()
        # syscall (CPython's fork check), and the reader waits once per token
        self._loop: asyncio.AbstractEventLoop | None = None
        # direct writes (see the module's doc): the response's send, once its body started
        self._send: Send | None = None
        self._event: ContentEvent | None = None  # how the HTTP side encodes a content chunk
        self._busy: asyncio.Task[None] | None = None  # a direct send that had to wait
        self._failed: BaseException | None = None  # a direct send that raised
        # an inbox dropped without aclose (a response cancelled before its body ran) still
        # stops its requests; it must not reference the inbox itself
        self._finalizer = weakref.finalize(self, _stop_all, self.outputs)

    def __aiter__(self) -> Inbox:
        return self

    async def __anext__(self) -> Piece:
        while True:
            if self._busy is not None or self._failed is not None:
                await self._settle()  # a direct write's chunk comes before anything taken here
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
        self.stop_writing()
        if self._busy is not None:
            self._busy.cancel()
        self._finalizer()

    def direct_event(self, event: ContentEvent) -> None:
        """Content chunks may be written directly, encoded by ``event`` (the HTTP side's own
        content template); only for answers whose content chunks carry nothing but text."""
        self._event = event

    def write_directly(self, send: Send) -> None:
        """The response's body started: direct writes go through ``send`` (once
        ``direct_event`` said how to encode them)."""
        self._send = send

    def stop_writing(self) -> None:
        """No direct writes any more (the response is ending)."""
        self._send = None

    def _write(self, index: int, entry: router_pb2.RouterGenerateResponse) -> bool:
        """Write ``entry`` (not a last one) of choice ``index`` as its chunk now, if the HTTP
        side is parked here and the entry is plain content; False: queue it instead."""
        waiter, send, event = self._waiter, self._send, self._event
        if waiter is None or waiter.done() or self._busy is not None or self._failed is not None:
            return False
        if (
            send is None
            or event is None
            or entry.logprobs
            or entry.reasoning_text
            or entry.tool_calls
        ):
            return False
        text = entry.text
        if not text:
            return True  # no chunk: the HTTP side would send nothing for it either
        body = event(index, text)
        sending = send({"type": "http.response.body", "body": body, "more_body": True})
        try:
            blocked = sending.send(None)
        except StopIteration:
            return True  # sent (the usual case: written to the transport)
        except BaseException as e:
            self._failed = e
            waiter.set_result(None)
            return True
        # it waits (the client's socket is full): the rest of this send runs as a task, which
        # the HTTP side waits for; what comes meanwhile queues here, merged
        loop = self._loop
        assert loop is not None
        self._busy = loop.create_task(_go_on(sending, blocked))
        self._busy.add_done_callback(self._sent)
        return True

    def _sent(self, busy: asyncio.Task[None]) -> None:
        # the HTTP side settles it (its error, if any) and then waits here again
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _settle(self) -> None:
        busy = self._busy
        if busy is not None:
            await asyncio.wait((busy,))
            self._busy = None
            if not busy.cancelled() and busy.exception() is not None:
                self._failed = busy.exception()
        if self._failed is not None:
            raise DirectSendFailed(self._failed)

    def _ready_output(self, output: Output) -> None:
        self._ready.append(output)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _finish(self, output: Output) -> None:
        if not output.done:
            output.done = True
            self._unfinished -= 1


async def _go_on(coro: Any, blocked: Any) -> None:
    """Finish ``coro``, which ``send(None)`` started and which then yielded ``blocked``."""
    await _resume(coro, blocked)


@types.coroutine
def _resume(coro: Any, blocked: Any) -> Generator[Any, Any, None]:
    # hands on what the coroutine yields (the futures it waits for) to the task running this
    # and passes back what the task sends or throws: as if the task had run it from the start
    try:
        while True:
            try:
                sent = yield blocked
            except BaseException as e:
                blocked = coro.throw(e)
            else:
                blocked = coro.send(sent)
    except StopIteration:
        return


def _stop_all(outputs: list[Output]) -> None:
    for output in outputs:
        output.stop()
