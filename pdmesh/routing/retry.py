"""Retries: exponential backoff with jitter (SGLang router defaults), which gRPC failures are
worth another attempt on another worker, and which broken streams may migrate.

``delay(n)`` before retry n (0-based) is ``min(max_backoff, initial * multiplier**n)`` scaled by
a uniform factor in ``[1 - jitter, 1 + jitter]``: the jitter keeps many clients that failed
together from retrying together.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

DEFAULT_MAX_RETRIES = 5
DEFAULT_INITIAL_BACKOFF_MS = 50
DEFAULT_MAX_BACKOFF_MS = 5000
DEFAULT_BACKOFF_MULTIPLIER = 2.0
DEFAULT_JITTER_FACTOR = 0.1

# the worker (or the path to it) failed, not the request: another worker may well succeed
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,  # only an upstream deadline: see is_retryable
        grpc.StatusCode.ABORTED,
    }
)
# the request itself is at fault: the same request fails the same way anywhere
CLIENT_ERRORS = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.CANCELLED,
    }
)


@dataclass(frozen=True)
class RetryConfig:
    max_retries: int = DEFAULT_MAX_RETRIES
    initial_backoff_ms: float = DEFAULT_INITIAL_BACKOFF_MS
    max_backoff_ms: float = DEFAULT_MAX_BACKOFF_MS
    backoff_multiplier: float = DEFAULT_BACKOFF_MULTIPLIER
    jitter_factor: float = DEFAULT_JITTER_FACTOR
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries={self.max_retries} must be >= 0")
        if self.initial_backoff_ms < 0 or self.max_backoff_ms < self.initial_backoff_ms:
            raise ValueError("need 0 <= initial_backoff_ms <= max_backoff_ms")
        if self.backoff_multiplier < 1.0:
            raise ValueError(f"backoff_multiplier={self.backoff_multiplier} must be >= 1")
        if not 0.0 <= self.jitter_factor <= 1.0:
            raise ValueError(f"jitter_factor={self.jitter_factor} must be in [0, 1]")

    @property
    def max_attempts(self) -> int:
        """Attempts in all: the first plus the retries (1 when retries are disabled)."""
        return 1 + self.max_retries if self.enabled else 1

    def delay_bounds(self, retry: int) -> tuple[float, float]:
        """(lowest, highest) seconds ``delay(retry)`` may return."""
        base = self._base_ms(retry)
        return (base * (1 - self.jitter_factor) / 1000, base * (1 + self.jitter_factor) / 1000)

    def delay(self, retry: int, rng: random.Random) -> float:
        """Seconds to wait before retry ``retry`` (0 = the first retry)."""
        jitter = rng.uniform(-self.jitter_factor, self.jitter_factor)
        return self._base_ms(retry) * (1 + jitter) / 1000

    def _base_ms(self, retry: int) -> float:
        # capped before it can overflow: multiplier**retry grows without bound
        base = float(self.initial_backoff_ms)
        for _ in range(retry):
            base *= self.backoff_multiplier
            if base >= self.max_backoff_ms:
                return float(self.max_backoff_ms)
        return min(base, float(self.max_backoff_ms))


def is_retryable(code: grpc.StatusCode, client_deadline_expired: bool = False) -> bool:
    """Whether a failure with ``code`` may be retried on another worker. DEADLINE_EXCEEDED is
    retryable only when the upstream call's own deadline expired, not the client's: once the
    client's deadline has passed nobody is waiting for the answer."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and client_deadline_expired:
        return False
    return code in RETRYABLE


def charges_breaker(code: grpc.StatusCode) -> bool:
    """Whether a failure with ``code`` counts against the worker's circuit breaker: worker and
    transport faults do; client errors and back-pressure (RESOURCE_EXHAUSTED: the worker is
    healthy, just full) do not."""
    return code not in CLIENT_ERRORS and code not in (
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


def migrates(code: grpc.StatusCode, client_deadline_expired: bool = False) -> bool:
    """Whether a stream that broke with ``code`` after tokens were sent may move to another
    worker (within the failed worker's ``--migration-limit``): exactly the failures its circuit
    breaker is charged for, i.e. the worker's, not the request's. A killed worker surfaces as
    UNAVAILABLE, UNKNOWN ("Stream removed"), INTERNAL (RST_STREAM) or a worker-side CANCELLED
    depending on timing, and a crashed engine as UNAVAILABLE or INTERNAL: all move. A client
    error (INVALID_ARGUMENT, ...) fails the same way anywhere, RESOURCE_EXHAUSTED is
    back-pressure, and once the client's deadline has passed nobody waits for the rest."""
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and client_deadline_expired:
        return False
    return charges_breaker(code)
