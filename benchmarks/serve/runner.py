"""Sending the requests: Poisson arrivals, a concurrency cap, warmup and the progress bar."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from benchmarks.serve.backends import Backend
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.timing import RequestResult

FD_LIMIT_WANTED = 65535
WARMUP_OUTPUT_LEN = 16  # enough to touch prefill and decode, short enough to be quick
ARRIVAL_STREAM = 1  # keeps the arrival draws independent of the dataset's, for the same seed


@dataclass
class RunResult:
    results: list[RequestResult]  # in send order
    duration_s: float  # first send to last completion
    max_in_flight: int


def raise_fd_limit() -> int:
    """Lift the soft open-files limit toward the hard one; the limit now in force.

    Every request in flight holds a socket, and a common default soft limit of 1024 would turn
    a burst (``--request-rate inf`` without ``--max-concurrency``) into "Too many open files"
    failures that say nothing about the server.
    """
    try:
        import resource
    except ImportError:  # not on this platform
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT_WANTED if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return soft


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests arriving as a Poisson process.

    Gaps are exponential with mean ``1 / rate``; the first request goes at 0. ``rate=inf``
    sends all of them at once. Absolute times (not sleeps between sends) keep a slow event
    loop from stretching the schedule.
    """
    if n <= 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng([ARRIVAL_STREAM, seed])
    gaps = rng.exponential(1.0 / rate, size=n - 1)
    return [0.0, *(float(t) for t in np.cumsum(gaps))]


async def run_requests(
    backend: Backend,
    requests: Sequence[BenchRequest],
    arrivals: Sequence[float],
    max_concurrency: int,
    run_id: str,
    progress: bool = True,
) -> RunResult:
    """Send every request at its arrival time, at most ``max_concurrency`` (0 = any) at once.

    A request's clock starts when it is actually sent, i.e. after it got a concurrency slot,
    as in SGLang: latencies measure the server, the wait for a slot is the client's choice.
    """
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None
    in_flight = 0
    max_in_flight = 0
    failed = 0
    bar = tqdm(
        total=len(requests), desc="requests", unit="req", file=sys.stderr, disable=not progress
    )
    start = time.perf_counter()

    async def one(req: BenchRequest, at: float) -> RequestResult:
        nonlocal in_flight, max_in_flight, failed
        delay = start + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is not None:
            await slots.acquire()
        in_flight += 1
        max_in_flight = max(max_in_flight, in_flight)
        try:
            result = await backend.send(req, f"bench-{run_id}-{req.index}")
        finally:
            in_flight -= 1
            if slots is not None:
                slots.release()
        result.start_s -= start
        if not result.success:
            failed += 1
            bar.set_postfix(failed=failed)
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(r, t) for r, t in zip(requests, arrivals)))
    finally:
        bar.close()
    return RunResult(list(results), time.perf_counter() - start, max_in_flight)


async def warmup(
    backend: Backend, request: BenchRequest, count: int, run_id: str
) -> list[RequestResult]:
    """Send ``count`` copies of ``request`` (short outputs) at once; their results."""
    short = dataclasses.replace(request, output_len=min(request.output_len, WARMUP_OUTPUT_LEN))
    return list(
        await asyncio.gather(
            *(backend.send(short, f"bench-{run_id}-warmup-{k}") for k in range(count))
        )
    )
