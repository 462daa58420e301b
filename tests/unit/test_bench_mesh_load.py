"""The mesh benchmark's flags, and how it drives an arm: closed-loop clients (a fixed number of
requests, or until time is up), the concurrency dealt out over client processes, and their
results merged."""

from __future__ import annotations

import asyncio
import dataclasses
import math

import pytest

from benchmarks.mesh.config import DIRECT, MeshBenchConfig
from benchmarks.mesh.load import ShareResult, closed_loop, merge, split
from benchmarks.mesh.main import build_parser
from benchmarks.mesh.steady import arrivals, steady_rate
from benchmarks.serve.backends import Backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.timing import RequestResult, StreamClock
from pdmesh.config import from_args


class CountingBackend(Backend):
    """Answers every request after ``delay`` seconds, counting how many run at once."""

    def __init__(self, delay: float) -> None:
        super().__init__(ServeBenchConfig())
        self.delay = delay
        self.in_flight = 0
        self.most = 0

    @property
    def target(self) -> str:
        return "counting"

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def _stream(
        self, req: BenchRequest, request_id: str, clock: StreamClock, result: RequestResult
    ) -> RequestResult:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(self.delay)
        clock.arrived(req.output_len)
        self.in_flight -= 1
        return clock.finish(result, req.output_len)


POOL = [BenchRequest(i, [1, 2, 3], 3, 4) for i in range(3)]


def test_a_fixed_number_of_requests_at_the_concurrency() -> None:
    backend = CountingBackend(0.01)
    results, start, end = asyncio.run(closed_loop(backend, POOL, 4, 10, 60.0, "t"))
    assert [r.index for r in results] == list(range(10))  # the pool cycled, renumbered
    assert all(r.success and r.output_tokens == 4 for r in results)
    assert backend.most == 4 and end > start


def test_until_time_is_up_then_the_requests_in_flight_finish() -> None:
    backend = CountingBackend(0.05)
    results, start, end = asyncio.run(closed_loop(backend, POOL, 2, 0, 0.12, "t"))
    # 2 clients, 0.05 s per request, new ones until 0.12 s: 3 rounds of 2
    assert len(results) == 6 and all(r.success for r in results)
    assert backend.in_flight == 0 and end - start >= 0.15


def test_concurrency_and_requests_are_dealt_out_over_client_processes() -> None:
    cfg = MeshBenchConfig(client_processes=3, num_requests=10)
    pool = [BenchRequest(i, [i], 1, 4) for i in range(7)]
    shares = split(DIRECT, "addr", cfg, pool, 8)
    assert [s.concurrency for s in shares] == [3, 3, 2]
    assert [s.num_requests for s in shares] == [4, 3, 3]
    assert [len(s.pool) for s in shares] == [3, 2, 2]
    assert len({s.run_id for s in shares}) == 3  # distinct request ids across processes
    # never a process without clients
    assert len(split(DIRECT, "addr", dataclasses.replace(cfg, num_requests=0), pool, 1)) == 1


def test_merged_results_span_every_process() -> None:
    a = ShareResult([RequestResult(0, 1, 1)], start=10.0, end=12.0, cpu_s=0.5)
    b = ShareResult([RequestResult(1, 1, 1)], start=10.5, end=13.0, cpu_s=0.25, warmup_error="x")
    load = merge([a, b])
    assert len(load.results) == 2 and load.duration_s == pytest.approx(3.0)
    assert load.loadgen_cpu_s == pytest.approx(0.75) and load.warmup_error == "x"


def test_every_flag_has_help_and_maps_to_a_field() -> None:
    flags = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(MeshBenchConfig)}
    assert all(a.help and len(a.help) > 20 for a in flags.values())


def test_flags_parse_and_bad_values_are_refused() -> None:
    cfg = from_args(
        MeshBenchConfig,
        build_parser().parse_args(["--concurrency", "4,16", "--arms", "direct,gateway"]),
    )
    assert cfg.levels() == [4, 16] and cfg.arm_list() == ["direct", "gateway"]
    assert cfg.ideal_tok_s(4) == pytest.approx(400.0)  # 4 requests every 10 ms
    assert MeshBenchConfig(worker="real").ideal_tok_s(4) is None
    for bad in (
        {"arms": "direct,nope"},
        {"concurrency": "0"},
        {"worker": "mock"},
        {"step_ms": 0.0},
        {"offline_reference": True},  # needs --worker real
    ):
        with pytest.raises(ValueError):
            MeshBenchConfig(**bad)  # type: ignore[arg-type]


def streamed(index: int, start: float, ttft: float, gaps: list[float]) -> RequestResult:
    r = RequestResult(index, 1, len(gaps) + 1, success=True, start_s=start, ttft_s=ttft)
    r.itl_s, r.output_tokens = gaps, len(gaps) + 1
    return r


def test_the_steady_rate_leaves_out_the_ramp_up_and_the_drain() -> None:
    # 2 clients; each request: first token 0.5 s after its send (a burst), then 10 tokens 0.1 s
    # apart; the second wave is sent at 1.5 s, the last send closes the window
    results = [
        streamed(0, 0.0, 0.5, [0.1] * 10),
        streamed(1, 0.0, 0.5, [0.1] * 10),
        streamed(2, 1.5, 0.1, [0.1] * 10),
        streamed(3, 1.5, 0.1, [0.1] * 10),
    ]
    assert arrivals(results[0])[:2] == pytest.approx([0.5, 0.6])
    # window [0.5, 1.5): 10 tokens per first-wave request, none of the second wave yet
    steady = steady_rate(results, 2)
    assert steady.tok_s == pytest.approx(20 / 1.0) and steady.window_s == pytest.approx(1.0)
    # only a first wave: no steady window
    assert math.isnan(steady_rate(results[:2], 2).tok_s)
