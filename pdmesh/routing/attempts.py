"""The attempt loop: one request's tries at getting a worker (or a prefill/decode pair) to
start it, and the rule for moving a broken stream to another worker. The aggregated and the
disaggregated start both run it (``services/router/generate.py``), so they retry, back off,
charge circuit breakers and mark workers unhealthy alike.

Workers here are opaque (anything with an ``id``: the breakers key by it); how a try is made
and what its failure looks like on the wire is the caller's: a try raises ``AttemptFailed``
with a ``Failure`` (worker, status code, why) and the edge error to pass on.

NOTE: a worker that failed is never tried again by the same loop (``once`` gets the workers
tried so far to exclude), so retries also end when every candidate has been tried; the backoff
never sleeps past the request's deadline (the next try would be refused anyway).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

import grpc

from pdmesh.routing.circuit_breaker import CircuitBreakers
from pdmesh.routing.retry import RetryConfig, charges_breaker, is_retryable, migrates


class Worker(Protocol):
    @property
    def id(self) -> str: ...


W = TypeVar("W", bound=Worker)
T = TypeVar("T")


@dataclass(frozen=True)
class Failure(Generic[W]):
    """One worker's failure as the loop weighs it."""

    worker: W
    code: grpc.StatusCode
    details: str  # why, for the log line that marks it unhealthy
    unreachable: bool = False  # the worker could not be reached: mark it unhealthy


class AttemptFailed(Exception, Generic[W]):
    """A try failed; ``error`` is what the caller raises if the loop gives up on it."""

    def __init__(self, failure: Failure[W], error: Exception) -> None:
        super().__init__(str(error))
        self.failure = failure
        self.error = error


@dataclass(frozen=True)
class Stopped(Generic[W]):
    """The loop ended without a start."""

    tried: tuple[W, ...]  # the workers that failed, in order
    last: AttemptFailed[W] | None  # the last failure, if any
    # True: the last failure may not be retried (not retryable, no attempt or time left);
    # False: no candidate was left to try (``once`` returned None)
    refused: bool


def _nothing(*_: Any) -> None:
    return None


def left(deadline: float) -> float:
    """Seconds until ``deadline`` (event-loop time)."""
    return deadline - asyncio.get_running_loop().time()


@dataclass
class Attempts:
    retry: RetryConfig = field(default_factory=RetryConfig)
    breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    rng: random.Random = field(default_factory=random.Random)  # backoff jitter
    on_retry: Callable[[], None] = _nothing  # before each backoff (the retries counter)
    # a worker found unreachable, and why: the router marks it unhealthy at once
    on_unreachable: Callable[[Any, str], None] = _nothing

    async def run(
        self, once: Callable[[tuple[W, ...]], Awaitable[T | None]], deadline: float
    ) -> T | Stopped[W]:
        """Call ``once(tried)`` until it starts the request (its result is returned), finds
        no candidate (None) or fails in a way that may not be retried (``AttemptFailed``); a
        failure is charged (``charge``) and followed by a backoff before the next try."""
        tried: tuple[W, ...] = ()
        last: AttemptFailed[W] | None = None
        for attempt in range(self.retry.max_attempts):
            try:
                started = await once(tried)
            except AttemptFailed as e:
                failure: Failure[W] = e.failure
                self.charge(failure)
                tried, last = (*tried, failure.worker), e
                if not self.may_retry(failure.code, attempt, deadline):
                    return Stopped(tried, last, refused=True)
                await self.backoff(attempt, deadline)
                continue
            if started is None:
                break
            return started
        return Stopped(tried, last, refused=False)

    def charge(self, failure: Failure[W]) -> None:
        """What a failure before anything was streamed costs its worker: unreachable, it is
        marked unhealthy; a worker's fault (not the request's) counts against its breaker."""
        if failure.unreachable:
            self.on_unreachable(failure.worker, failure.details)
        if charges_breaker(failure.code):
            self.breakers.record_failure(failure.worker.id)

    def may_retry(self, code: grpc.StatusCode, attempt: int, deadline: float) -> bool:
        expired = left(deadline) <= 0
        return attempt + 1 < self.retry.max_attempts and is_retryable(code, expired)

    async def backoff(self, attempt: int, deadline: float) -> None:
        self.on_retry()
        # never sleep past the client's deadline: the next attempt would be refused anyway
        await asyncio.sleep(min(self.retry.delay(attempt, self.rng), max(left(deadline), 0)))

    def available(self, candidates: Sequence[W]) -> list[W]:
        """``candidates`` whose circuit is not open; when every circuit is open, all of them
        (a request that names the failing worker beats a vague "none available")."""
        return [w for w in candidates if self.breakers.is_available(w.id)] or list(candidates)

    def stream_broke(self, failure: Failure[W], deadline: float) -> bool:
        """A stream broke after tokens were sent: charge the worker's breaker (its own
        failures only) and say whether the request may migrate (``retry.migrates``: any worker
        fault, never a client error, not past the deadline); a migrating request's unreachable
        worker is marked unhealthy."""
        if charges_breaker(failure.code):
            self.breakers.record_failure(failure.worker.id)
        if not migrates(failure.code, left(deadline) <= 0):
            return False
        if failure.unreachable:
            self.on_unreachable(failure.worker, failure.details)
        return True


def within_migration_limit(moves: int, limit: int) -> bool:
    """Whether a request may make its ``moves``-th move off a worker whose advertised
    ``--migration-limit`` is ``limit``."""
    return moves <= limit
