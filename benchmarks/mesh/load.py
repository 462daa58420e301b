"""Driving one arm at one concurrency: closed-loop clients over ``benchmarks.serve``'s
backends, in this process or split over ``--client-processes`` processes whose results are
merged.

Each client sends a request, waits for its last token and sends the next, so exactly
``concurrency`` requests are in flight until the clients stop: after ``--num-requests`` in all,
or once ``--arm-seconds`` have passed (the requests in flight then finish). Prompts come from a
pool the clients cycle through. The load generator measures its own CPU over the timed part
(after the warmup), and ``on_start`` runs right before it begins, in the parent, so the other
processes' CPU can be sampled over the same window.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import multiprocessing
import multiprocessing.process
import multiprocessing.synchronize
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from benchmarks.mesh.arms import ARMS, backend_for
from benchmarks.mesh.config import MeshBenchConfig
from benchmarks.routers.fleet import process_cpu_seconds
from benchmarks.serve.backends import Backend
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.runner import raise_fd_limit, warmup
from benchmarks.serve.timing import RequestResult

# a client process gets this long to start and warm up before the parent gives up on it
CHILD_START_S = 180.0
POLL_S = 0.5


@dataclass(frozen=True)
class Share:
    """One load generator process's part of an arm (picklable: it crosses to a child)."""

    arm: str
    target: str
    cfg: MeshBenchConfig
    pool: list[BenchRequest]  # prompts, cycled
    concurrency: int
    num_requests: int  # 0: until cfg.arm_seconds have passed
    run_id: str


@dataclass
class ShareResult:
    results: list[RequestResult]
    start: float  # time.perf_counter() when the timed part began (CLOCK_MONOTONIC: system-wide)
    end: float
    cpu_s: float  # this process's CPU during the timed part
    warmup_error: str = ""  # set when every warmup request failed


@dataclass
class ArmLoad:
    """The merged results of every share of one arm."""

    results: list[RequestResult]
    duration_s: float  # first send to last completion, over every process
    loadgen_cpu_s: float
    warmup_error: str


async def closed_loop(
    backend: Backend,
    pool: Sequence[BenchRequest],
    concurrency: int,
    num_requests: int,
    seconds: float,
    run_id: str,
) -> tuple[list[RequestResult], float, float]:
    """``concurrency`` clients each sending their next request as soon as one ends; the
    results (``start_s`` from this loop's start), and the loop's start and end times."""
    start = time.perf_counter()
    deadline = start + seconds if num_requests == 0 else math.inf
    numbers = itertools.count()
    results: list[RequestResult] = []

    async def client() -> None:
        while True:
            i = next(numbers)
            if (num_requests and i >= num_requests) or time.perf_counter() >= deadline:
                return
            req = replace(pool[i % len(pool)], index=i)
            result = await backend.send(req, f"bench-{run_id}-{i}")
            result.start_s -= start
            results.append(result)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return sorted(results, key=lambda r: r.index), start, time.perf_counter()


async def run_share(share: Share, on_start: Callable[[], None]) -> ShareResult:
    """Warm up, call ``on_start``, then the timed closed loop."""
    backend = backend_for(ARMS[share.arm], share.target, share.cfg)
    error = ""
    async with backend:
        if share.cfg.warmup:
            warm = await warmup(backend, share.pool[0], share.concurrency, share.run_id)
            if not any(r.success for r in warm):
                error = warm[0].error
        on_start()
        cpu = process_cpu_seconds(os.getpid())
        results, start, end = await closed_loop(
            backend,
            share.pool,
            share.concurrency,
            share.num_requests,
            share.cfg.arm_seconds,
            share.run_id,
        )
        cpu = process_cpu_seconds(os.getpid()) - cpu
    return ShareResult(results, start, end, cpu, error)


def split(
    arm: str, target: str, cfg: MeshBenchConfig, pool: list[BenchRequest], concurrency: int
) -> list[Share]:
    """The arm's shares: the concurrency, the prompts and --num-requests dealt out over at most
    --client-processes processes (none gets zero clients)."""
    n = min(cfg.client_processes, concurrency)
    run_id = secrets.token_hex(3)
    shares = []
    for k in range(n):
        clients = concurrency // n + (k < concurrency % n)
        requests = cfg.num_requests // n + (k < cfg.num_requests % n) if cfg.num_requests else 0
        if cfg.num_requests and requests == 0:
            continue
        shares.append(
            Share(arm, target, cfg, pool[k::n] or pool, clients, requests, f"{run_id}{k}")
        )
    return shares


def merge(parts: list[ShareResult]) -> ArmLoad:
    results = [r for p in parts for r in p.results]
    duration = max(p.end for p in parts) - min(p.start for p in parts)
    errors = [p.warmup_error for p in parts if p.warmup_error]
    return ArmLoad(results, duration, sum(p.cpu_s for p in parts), errors[0] if errors else "")


def run_arm(shares: list[Share], on_start: Callable[[], None]) -> ArmLoad:
    """Every share, in this process (one share) or one process each, started together."""
    raise_fd_limit()
    if len(shares) == 1:
        return merge([asyncio.run(run_share(shares[0], on_start))])
    # spawn, not fork: the parent holds grpc channels and threads a fork would copy broken
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(shares) + 1)
    out: multiprocessing.Queue[ShareResult] = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(s, barrier, out), daemon=True) for s in shares]
    for p in procs:
        p.start()
    try:
        try:
            barrier.wait(CHILD_START_S)
        except threading.BrokenBarrierError as e:
            raise RuntimeError("a load generator process did not start (see its traceback)") from e
        on_start()
        parts = _collect(out, procs, shares[0].cfg)
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    return merge(parts)


def _collect(
    out: multiprocessing.Queue[ShareResult],
    procs: Sequence[multiprocessing.process.BaseProcess],
    cfg: MeshBenchConfig,
) -> list[ShareResult]:
    """Every child's result; raises when one died without sending it, or all took too long."""
    deadline = time.monotonic() + cfg.arm_seconds + cfg.request_timeout + CHILD_START_S
    parts: list[ShareResult] = []
    while len(parts) < len(procs):
        try:
            parts.append(out.get(timeout=POLL_S))
        except queue.Empty:
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                raise RuntimeError("a load generator process failed or hung") from None
    return parts


def _child(
    share: Share, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue
) -> None:
    raise_fd_limit()

    # the barrier wait blocks this process's loop, which has nothing else to do before the run
    def on_start() -> None:
        barrier.wait(CHILD_START_S)

    out.put(asyncio.run(run_share(share, on_start)))
