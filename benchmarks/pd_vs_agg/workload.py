"""The mixed workload: steady streams and long prompts at the same time, through the router.

- Streams: ``--stream-clients`` closed-loop clients; each sends a short prompt asking for a long
  output and, as soon as it ends, the next one, for as long as the long prompts are running.
  Their decoding is what a long prefill interrupts on an aggregated worker.
- Long prompts: ``--long-requests`` prompts of ``--long-input-min..max`` tokens with short
  outputs, arriving as a Poisson process at ``--long-rate`` (``benchmarks.serve``'s arrivals).

Prompts are random token ids drawn from ``--seed`` and the repeat alone, so every topology gets
the same prompts at the same times. Requests ask for exact output lengths (``ignore_eos``) and
token ids only (``detokenize: false``): no tokenizer anywhere.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.pd_vs_agg.config import PdVsAggConfig
from benchmarks.serve.backends import Backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.runner import poisson_arrivals, run_requests, warmup
from benchmarks.serve.timing import RequestResult

# request ids must differ between streams and long prompts of one run
STREAM_INDEX_BASE = 1_000_000
STREAM_INDEX_STRIDE = 100_000
WARMUP_REQUESTS = 2  # per kind: with round_robin, one lands on each aggregated worker
WARMUP_STREAM = 2**31 - 1  # a seed component no timed request uses


@dataclass
class MixedRun:
    streams: list[RequestResult]
    longs: list[RequestResult]
    duration_s: float  # first send to last completion


def serve_config(cfg: PdVsAggConfig, router: str) -> ServeBenchConfig:
    """The load generator's gRPC backend settings for ``router``."""
    return ServeBenchConfig(
        backend="grpc",
        grpc_target=router,
        input_format="token-ids",
        ignore_eos=True,
        extra_request_body='{"detokenize": false}',
        request_timeout=cfg.request_timeout,
        progress=cfg.progress,
    )


class Prompts:
    """The requests of one repeat: the same for every topology."""

    def __init__(self, cfg: PdVsAggConfig, vocab_size: int, repeat: int) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.repeat = repeat

    def ids(self, n: int, *stream: int) -> list[int]:
        rng = np.random.default_rng([self.cfg.seed, self.repeat, *stream])
        return [int(x) for x in rng.integers(0, self.vocab_size, size=n)]

    def longs(self) -> list[BenchRequest]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, self.repeat, 0])
        lens = rng.integers(cfg.long_input_min, cfg.long_input_max + 1, size=cfg.long_requests)
        return [
            BenchRequest(i, self.ids(int(n), 1, i), int(n), cfg.long_output_len)
            for i, n in enumerate(lens)
        ]

    def stream(self, client: int, k: int) -> BenchRequest:
        cfg = self.cfg
        index = STREAM_INDEX_BASE + client * STREAM_INDEX_STRIDE + k
        ids = self.ids(cfg.stream_input_len, 2, client, k)
        return BenchRequest(index, ids, len(ids), cfg.stream_output_len)

    def arrivals(self) -> list[float]:
        return poisson_arrivals(
            self.cfg.long_requests, self.cfg.long_rate, self.cfg.seed * 1000 + self.repeat
        )


async def warm(backend: Backend, cfg: PdVsAggConfig, vocab_size: int, run_id: str) -> None:
    """Both kinds of request on every worker before timing (CUDA graphs, Triton kernels, the
    decode's registration with the prefill); raises when a kind fails every time."""
    prompts = Prompts(cfg, vocab_size, WARMUP_STREAM)
    longest = BenchRequest(0, prompts.ids(cfg.long_input_max, 9), cfg.long_input_max, 16)
    for req in (longest, prompts.stream(0, 0)):
        results = await warmup(backend, req, WARMUP_REQUESTS, run_id)
        if not any(r.success for r in results):
            raise RuntimeError(f"every warmup request failed: {results[0].error}")


async def run_mixed(backend: Backend, prompts: Prompts, run_id: str) -> MixedRun:
    """Streams for as long as the long prompts run; every request's result."""
    cfg = prompts.cfg
    long_done = asyncio.Event()
    streams: list[RequestResult] = []
    start = time.perf_counter()

    async def client(c: int) -> None:
        k = 0
        while not long_done.is_set():
            req = prompts.stream(c, k)
            result = await backend.send(req, f"bench-{run_id}-{req.index}")
            result.start_s -= start
            streams.append(result)
            if not result.success:
                return  # counted; a client that fails at once must not spin
            k += 1

    clients = [asyncio.create_task(client(c)) for c in range(cfg.stream_clients)]
    try:
        longs = await run_requests(
            backend, prompts.longs(), prompts.arrivals(), 0, run_id, cfg.progress
        )
    finally:
        long_done.set()  # each stream ends its current request (within --request-timeout)
        await asyncio.gather(*clients)
    return MixedRun(streams, longs.results, time.perf_counter() - start)
