"""Admission control: at most ``max_concurrent_requests`` requests run in the router at once;
up to ``queue_size`` more wait (first come, first served) for up to ``queue_timeout_secs``.

SGLang router semantics and defaults (``--max-concurrent-requests 256 --queue-size 100
--queue-timeout-secs 60``): a full queue refuses at once (``QueueFullError``:
RESOURCE_EXHAUSTED, HTTP 429), a request that waited too long gives up (``QueueTimeoutError``:
DEADLINE_EXCEEDED, HTTP 408), ``max_concurrent_requests <= 0`` means no limit, ``queue_size
0`` no queue. SGLang counts slots with a token bucket that a request returns when it ends
(``--rate-limit-tokens-per-second`` refills it as well); here a slot is only ever given back by
the request that held it, so the limit is exactly "requests in flight".

    admission = Admission(AdmissionConfig(max_concurrent_requests=8))
    ticket = admission.ticket()
    context.add_done_callback(lambda _: ticket.release())   # however the call ends
    await ticket.acquire()                                  # may raise QueueFull/QueueTimeout
    try: ... finally: ticket.release()

A ticket's ``release`` is idempotent and also ends a wait still in the queue, so calling it
from both a ``finally`` and the call's done-callback (which grpc runs even when the handler is
cancelled while parked at a ``yield``, where its ``finally`` does not run yet) never gives a
slot back twice nor leaks one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass

from pdmesh.errors import DeadlineExceededError, ResourceExhaustedError

DEFAULT_MAX_CONCURRENT_REQUESTS = 256
DEFAULT_QUEUE_SIZE = 100
DEFAULT_QUEUE_TIMEOUT_SECS = 60.0


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS  # <= 0: unlimited
    queue_size: int = DEFAULT_QUEUE_SIZE
    queue_timeout_secs: float = DEFAULT_QUEUE_TIMEOUT_SECS

    def __post_init__(self) -> None:
        if self.queue_size < 0:
            raise ValueError(f"queue_size={self.queue_size} must be >= 0")
        if not self.queue_timeout_secs > 0:
            raise ValueError(f"queue_timeout_secs={self.queue_timeout_secs} must be > 0")

    @property
    def unlimited(self) -> bool:
        return self.max_concurrent_requests <= 0


class QueueFullError(ResourceExhaustedError):
    """Every slot is taken and the queue holds ``queue_size`` requests already."""

    error_code = "queue_full"


class QueueTimeoutError(DeadlineExceededError):
    """The request waited ``queue_timeout_secs`` in the queue without getting a slot."""

    error_code = "queue_timeout"


class _State(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    HOLDING = "holding"
    DONE = "done"


class Admission:
    def __init__(
        self, config: AdmissionConfig | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config or AdmissionConfig()
        self._clock = clock
        self._active = 0
        # futures of the waiting tickets, oldest first; resolved (None) = the slot is theirs
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def active(self) -> int:
        """Requests holding a slot (with no limit: requests admitted and not yet done)."""
        return self._active

    @property
    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiters)

    def ticket(self) -> Ticket:
        return Ticket(self)

    def _try_take(self) -> bool:
        # never jump the queue: a free slot with waiters is already on its way to the oldest
        if self.config.unlimited or (
            self._active < self.config.max_concurrent_requests and not self._waiters
        ):
            self._active += 1
            return True
        return False

    def _give_back(self) -> None:
        """A slot is free: hand it to the oldest live waiter (the count stays), else drop it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._active -= 1

    def _forget(self, waiter: asyncio.Future[None]) -> None:
        # not there when it was already handed a slot (popped) or expired
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)


class Ticket:
    """One request's claim on a slot: ``acquire`` once, ``release`` any number of times."""

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._state = _State.NEW
        self._waiter: asyncio.Future[None] | None = None
        self.waited = 0.0  # seconds spent in the queue

    @property
    def holding(self) -> bool:
        return self._state is _State.HOLDING

    async def acquire(self) -> None:
        """Take a slot, waiting in the queue if need be. Raises ``QueueFullError`` when the
        queue is full, ``QueueTimeoutError`` after ``queue_timeout_secs``, CancelledError when
        ``release`` ended the wait first."""
        if self._state is _State.DONE:  # released before it asked: the request is over
            raise asyncio.CancelledError("the request ended before it asked for a slot")
        if self._state is not _State.NEW:
            raise RuntimeError(f"a ticket is acquired once (this one is {self._state.value})")
        adm = self._admission
        cfg = adm.config
        if adm._try_take():
            self._state = _State.HOLDING
            return
        if len(adm._waiters) >= cfg.queue_size:
            self._state = _State.DONE
            raise QueueFullError(
                f"the router is at its limit of {cfg.max_concurrent_requests} concurrent "
                f"requests and its queue of {cfg.queue_size} is full (--max-concurrent-requests, "
                "--queue-size); retry later"
            )
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        adm._waiters.append(waiter)
        self._waiter, self._state = waiter, _State.WAITING
        start = adm._clock()
        expiry = loop.call_later(cfg.queue_timeout_secs, self._expire, waiter)
        try:
            await waiter
        except BaseException:
            adm._forget(waiter)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                adm._give_back()  # handed a slot just as we were cancelled: pass it on
            self._state = _State.DONE
            raise
        finally:
            expiry.cancel()
            self.waited = adm._clock() - start
        if self._state is _State.DONE:  # released while the hand-over was on its way
            adm._give_back()
            raise asyncio.CancelledError("the request ended while waiting for a slot")
        self._state = _State.HOLDING

    def _expire(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done():
            return
        self._admission._forget(waiter)
        cfg = self._admission.config
        waiter.set_exception(
            QueueTimeoutError(
                f"the request waited {cfg.queue_timeout_secs:g} s in the router's queue for "
                f"one of its {cfg.max_concurrent_requests} request slots (--queue-timeout-secs) "
                "and never reached a worker; retry later"
            )
        )

    def release(self) -> None:
        """The request is over: give the slot back, or leave the queue. Idempotent."""
        state, self._state = self._state, _State.DONE
        if state is _State.HOLDING:
            self._admission._give_back()
        elif state is _State.WAITING and self._waiter is not None and not self._waiter.done():
            self._admission._forget(self._waiter)
            self._waiter.cancel()
