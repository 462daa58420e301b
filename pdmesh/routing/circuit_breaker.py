"""Per-worker circuit breakers (SGLang router semantics).

Closed: traffic flows; ``failure_threshold`` consecutive failures, all within
``window_duration`` seconds of the first of them, open the circuit (failures spread wider than
the window restart the count: a worker failing once a minute is not "down").
Open: no traffic until ``timeout_duration`` seconds have passed, then Half-Open.
Half-Open: traffic flows as a probe; ``success_threshold`` successes close the circuit, any
failure opens it again (for another full timeout).

Only worker faults are recorded (see ``retry.charges_breaker``): a client's bad request says
nothing about the worker. The clock is injectable so tests need no sleeps.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_FAILURE_THRESHOLD = 5
DEFAULT_SUCCESS_THRESHOLD = 2
DEFAULT_TIMEOUT_DURATION_SECS = 30.0
DEFAULT_WINDOW_DURATION_SECS = 60.0


class CircuitState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class CircuitBreakerConfig:
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    success_threshold: int = DEFAULT_SUCCESS_THRESHOLD
    timeout_duration_secs: float = DEFAULT_TIMEOUT_DURATION_SECS
    window_duration_secs: float = DEFAULT_WINDOW_DURATION_SECS
    enabled: bool = True

    def __post_init__(self) -> None:
        if self.failure_threshold < 1 or self.success_threshold < 1:
            raise ValueError("failure_threshold and success_threshold must be >= 1")
        if self.timeout_duration_secs < 0 or self.window_duration_secs <= 0:
            raise ValueError("timeout_duration_secs must be >= 0, window_duration_secs > 0")


class CircuitBreaker:
    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._state = CircuitState.CLOSED
        self.consecutive_failures = 0
        self._first_failure_at = 0.0
        self._opened_at = 0.0
        self._half_open_successes = 0
        self.transitions = 0  # for metrics

    @property
    def state(self) -> CircuitState:
        # Open -> Half-Open happens lazily, when someone looks: no timer task per worker
        if (
            self._state is CircuitState.OPEN
            and self._clock() - self._opened_at >= self.config.timeout_duration_secs
        ):
            self._to(CircuitState.HALF_OPEN)
        return self._state

    def is_available(self) -> bool:
        return not self.config.enabled or self.state is not CircuitState.OPEN

    def record_success(self) -> None:
        state = self.state
        self.consecutive_failures = 0
        if state is CircuitState.HALF_OPEN:
            self._half_open_successes += 1
            if self._half_open_successes >= self.config.success_threshold:
                self._to(CircuitState.CLOSED)

    def record_failure(self) -> None:
        state = self.state
        now = self._clock()
        if state is CircuitState.HALF_OPEN:
            self._open(now)
            return
        if state is CircuitState.OPEN:
            return  # a straggler from before it opened: the timeout runs from the opening
        if (
            self.consecutive_failures == 0
            or now - self._first_failure_at > self.config.window_duration_secs
        ):
            self.consecutive_failures, self._first_failure_at = 0, now
        self.consecutive_failures += 1
        if self.consecutive_failures >= self.config.failure_threshold:
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._to(CircuitState.OPEN)

    def _to(self, state: CircuitState) -> None:
        if state is not self._state:
            self.transitions += 1
        self._state = state
        self._half_open_successes = 0
        if state is CircuitState.CLOSED:
            self.consecutive_failures = 0


class CircuitBreakers:
    """One breaker per worker key, created on first use."""

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CircuitBreakerConfig()
        self._clock = clock
        self._breakers: dict[Hashable, CircuitBreaker] = {}

    def get(self, worker: Hashable) -> CircuitBreaker:
        breaker = self._breakers.get(worker)
        if breaker is None:
            breaker = self._breakers[worker] = CircuitBreaker(self.config, self._clock)
        return breaker

    def is_available(self, worker: Hashable) -> bool:
        return not self.config.enabled or self.get(worker).is_available()

    def record_success(self, worker: Hashable) -> None:
        if self.config.enabled:
            self.get(worker).record_success()

    def record_failure(self, worker: Hashable) -> None:
        if self.config.enabled:
            self.get(worker).record_failure()

    def remove(self, worker: Hashable) -> None:
        self._breakers.pop(worker, None)
