"""From per-request results to the run's summary: latency distributions, throughput, goodput.

Latencies cover completed requests only; ITL pools every gap of every completed request (as
SGLang does), so long outputs weigh more there than in TPOT, which is one value per request.
Throughputs divide by the whole run's duration (first send to last completion).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.serve.timing import RequestResult

MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True)
class Distribution:
    """Summary statistics of one latency, in milliseconds."""

    count: int
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Distribution | None:
        """None for no values. Percentiles interpolate linearly (numpy's default)."""
        if not values_ms:
            return None
        a = np.asarray(values_ms, dtype=np.float64)
        p50, p90, p99 = (float(x) for x in np.percentile(a, [50, 90, 99]))
        return cls(
            len(a), float(a.mean()), float(a.std()), float(a.min()), p50, p90, p99, float(a.max())
        )


@dataclass(frozen=True)
class SLO:
    """Goodput targets in ms; a request is good when it meets every one that is set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def given(self) -> bool:
        return any(x is not None for x in (self.ttft_ms, self.tpot_ms, self.e2e_ms))

    def met(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        if self.ttft_ms is not None and r.ttft_s * 1000 > self.ttft_ms:
            return False
        tpot = r.tpot_s
        # TPOT is undefined for a one-token output: nothing to miss
        if self.tpot_ms is not None and tpot is not None and tpot * 1000 > self.tpot_ms:
            return False
        return not (self.e2e_ms is not None and r.e2e_s * 1000 > self.e2e_ms)


@dataclass(frozen=True)
class ErrorCount:
    message: str
    count: int


@dataclass
class Summary:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    usage_reported: int  # completed requests whose counts came from the server's usage
    output_len_mismatch: int  # completed requests whose output differs from what they asked
    request_throughput: float  # completed requests / s
    input_throughput: float  # prompt tokens of completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float
    concurrency: float  # mean requests in flight: sum of e2e / duration
    max_in_flight: int
    good_requests: int | None  # None without SLOs
    goodput: float | None  # good requests / s
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2e_ms: Distribution | None
    errors: list[ErrorCount] = field(default_factory=list)  # first distinct messages


def summarize(
    results: Sequence[RequestResult],
    duration_s: float,
    slo: SLO | None = None,
    max_in_flight: int = 0,
    max_errors: int = MAX_ERRORS_SHOWN,
) -> Summary:
    done = [r for r in results if r.success]
    failed = [r for r in results if not r.success]
    dur = duration_s if duration_s > 0 else float("nan")
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    good = sum(slo.met(r) for r in results) if slo is not None and slo.given() else None
    tpots = [t * 1000 for r in done if (t := r.tpot_s) is not None]
    return Summary(
        completed=len(done),
        failed=len(failed),
        duration_s=duration_s,
        total_input_tokens=n_in,
        total_output_tokens=n_out,
        usage_reported=sum(r.usage_reported for r in done),
        output_len_mismatch=sum(r.output_tokens != r.expected_output_len for r in done),
        request_throughput=len(done) / dur,
        input_throughput=n_in / dur,
        output_throughput=n_out / dur,
        total_token_throughput=(n_in + n_out) / dur,
        concurrency=sum(r.e2e_s for r in done) / dur,
        max_in_flight=max_in_flight,
        good_requests=good,
        goodput=None if good is None else good / dur,
        ttft_ms=Distribution.of([r.ttft_s * 1000 for r in done]),
        tpot_ms=Distribution.of(tpots),
        itl_ms=Distribution.of([g * 1000 for r in done for g in r.itl_s]),
        e2e_ms=Distribution.of([r.e2e_s * 1000 for r in done]),
        errors=first_errors(failed, max_errors),
    )


def first_errors(failed: Sequence[RequestResult], limit: int) -> list[ErrorCount]:
    """The first ``limit`` distinct error messages in send order, each with how often it came."""
    counts: dict[str, int] = {}
    for r in failed:
        counts[r.error] = counts.get(r.error, 0) + 1
    return [ErrorCount(m, c) for m, c in list(counts.items())[:limit]]
