from __future__ import annotations

import random

import grpc
import pytest

from pdmesh.routing import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakers,
    CircuitState,
    RetryConfig,
    charges_breaker,
    is_retryable,
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_defaults_follow_sglang() -> None:
    cfg = CircuitBreakerConfig()
    assert (cfg.failure_threshold, cfg.success_threshold) == (5, 2)
    assert (cfg.timeout_duration_secs, cfg.window_duration_secs) == (30.0, 60.0)


def test_breaker_full_cycle() -> None:
    clock = Clock()
    cb = CircuitBreaker(clock=clock)
    for _ in range(4):
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED and cb.is_available()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN and not cb.is_available()
    clock.now = 29.9
    assert cb.state is CircuitState.OPEN
    clock.now = 30.0
    assert cb.state is CircuitState.HALF_OPEN and cb.is_available()
    cb.record_success()
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    assert cb.state is CircuitState.CLOSED and cb.consecutive_failures == 0
    assert cb.transitions == 3


def test_breaker_half_open_failure_reopens_for_a_full_timeout() -> None:
    clock = Clock()
    cb = CircuitBreaker(CircuitBreakerConfig(failure_threshold=1), clock)
    cb.record_failure()
    clock.now = 30
    assert cb.state is CircuitState.HALF_OPEN
    cb.record_success()
    cb.record_failure()
    assert cb.state is CircuitState.OPEN
    clock.now = 59
    assert not cb.is_available()
    clock.now = 60
    assert cb.is_available()


def test_breaker_success_resets_the_consecutive_count() -> None:
    cb = CircuitBreaker(clock=Clock())
    for _ in range(4):
        cb.record_failure()
    cb.record_success()
    for _ in range(4):
        cb.record_failure()
    assert cb.state is CircuitState.CLOSED


def test_breaker_failures_must_fall_within_the_window() -> None:
    clock = Clock()
    cb = CircuitBreaker(clock=clock)
    for i in range(4):
        clock.now = i * 20.0  # 0, 20, 40, 60: all within 60 s of the first
        cb.record_failure()
    clock.now = 61.0  # 5th failure, but 61 s after the streak began: it starts a new one
    cb.record_failure()
    assert cb.state is CircuitState.CLOSED and cb.consecutive_failures == 1
    for _ in range(4):
        cb.record_failure()
    assert cb.state is CircuitState.OPEN


def test_breaker_set_is_per_worker_and_can_be_disabled() -> None:
    clock = Clock()
    breakers = CircuitBreakers(CircuitBreakerConfig(failure_threshold=2), clock)
    breakers.record_failure("p")
    breakers.record_failure("p")
    assert not breakers.is_available("p")
    assert breakers.is_available("d")  # the other side of the pair is not charged
    breakers.remove("p")
    assert breakers.is_available("p")
    off = CircuitBreakers(CircuitBreakerConfig(failure_threshold=1, enabled=False), clock)
    off.record_failure("p")
    assert off.is_available("p")


def test_retry_defaults_follow_sglang() -> None:
    cfg = RetryConfig()
    assert (cfg.max_retries, cfg.initial_backoff_ms, cfg.max_backoff_ms) == (5, 50, 5000)
    assert (cfg.backoff_multiplier, cfg.jitter_factor) == (2.0, 0.1)
    assert cfg.max_attempts == 6
    assert RetryConfig(enabled=False).max_attempts == 1


@pytest.mark.parametrize("retry", range(12))
def test_backoff_stays_within_bounds(retry: int) -> None:
    cfg = RetryConfig()
    base = min(5000, 50 * 2.0**retry) / 1000
    assert cfg.delay_bounds(retry) == pytest.approx((base * 0.9, base * 1.1))
    rng = random.Random(retry)
    delays = [cfg.delay(retry, rng) for _ in range(200)]
    assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
    assert max(delays) - min(delays) > base * 0.1  # the jitter actually spreads them


def test_backoff_caps_huge_retry_counts_and_zero_jitter_is_exact() -> None:
    cfg = RetryConfig(jitter_factor=0.0)
    assert cfg.delay(10_000, random.Random(0)) == 5.0
    assert [cfg.delay(n, random.Random(0)) for n in range(3)] == [0.05, 0.1, 0.2]


def test_retryable_codes() -> None:
    codes = grpc.StatusCode
    for code in (codes.UNAVAILABLE, codes.RESOURCE_EXHAUSTED, codes.ABORTED):
        assert is_retryable(code)
    assert is_retryable(codes.DEADLINE_EXCEEDED)
    assert not is_retryable(codes.DEADLINE_EXCEEDED, client_deadline_expired=True)
    for code in (codes.INVALID_ARGUMENT, codes.NOT_FOUND, codes.CANCELLED, codes.INTERNAL):
        assert not is_retryable(code)


def test_client_errors_never_charge_a_breaker() -> None:
    codes = grpc.StatusCode
    for code in (codes.INVALID_ARGUMENT, codes.FAILED_PRECONDITION, codes.OUT_OF_RANGE):
        assert not charges_breaker(code)
    assert not charges_breaker(codes.RESOURCE_EXHAUSTED)
    for code in (codes.UNAVAILABLE, codes.INTERNAL, codes.DEADLINE_EXCEEDED, codes.UNKNOWN):
        assert charges_breaker(code)


def test_load_tracker_counts_in_flight_and_tokens() -> None:
    from pdmesh.routing import LoadTracker, WorkerLoad

    loads = LoadTracker()
    loads.start("a", 10)
    loads.start("a", 5)
    loads.finish("a", 10)
    loads.report_page_usage("a", 0.5)
    assert loads.view(["a", "b"]) == {"a": WorkerLoad(1, 5, 0.5), "b": WorkerLoad()}
    loads.remove("a")
    loads.finish("a", 3)
    assert loads.get("a") == WorkerLoad()
