"""The router benchmarks at a tiny size, with real processes: ``router-overhead`` over echo
workers (pdmesh router and gateway, the bare grpc.aio floor) and ``routing-quality`` over real
engine workers. The sglang-router arms are left out and reported as skipped when sglang_router
is not importable (simulated here); one test runs sglang-router over the echo workers when it is
installed (pip install 'pdmesh[bench]'). Figures are never asserted, only the reports' structure
and what must hold whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from pathlib import Path

import aiohttp
import grpc
import pytest

from benchmarks.routers import launch, overhead, quality
from benchmarks.routers import overhead_config as oc
from benchmarks.routers.echo_worker import echo_ids
from benchmarks.routers.fleet import Fleet, free_port
from benchmarks.routers.loadgen import HttpGenerate, RequestFailed, RouterGrpc, WorkerGrpc
from benchmarks.routers.quality_config import QualityConfig
from benchmarks.routers.stats import median
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

pytestmark = pytest.mark.bench

TINY_OVERHEAD = oc.OverheadConfig(
    workers=2,
    latency_requests=20,
    throughput_requests=40,
    concurrency=4,
    repeats=1,
    warmup_requests=4,
    startup_timeout=60,
    progress=False,
)


def _no_sglang_router(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(launch, "sglang_router_available", lambda: False)


def test_router_overhead_without_sglang_router(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _no_sglang_router(monkeypatch)
    out = tmp_path / "overhead.json"
    argv = ["--workers", "2", "--latency-requests", "20", "--throughput-requests", "40",
            "--concurrency", "4", "--repeats", "2", "--warmup-requests", "4", "--no-progress",
            "--log-dir", str(tmp_path / "logs"), "--json-out", str(out)]  # fmt: skip
    assert overhead.main(argv) == 0
    printed = capsys.readouterr()
    assert f"skipping {oc.SGLANG}: {launch.SGLANG_MISSING}" in printed.err
    doc = json.loads(out.read_text())
    assert doc["skipped"] == {oc.SGLANG: launch.SGLANG_MISSING}
    arms = doc["arms"]
    expected = [oc.DIRECT_HTTP, oc.DIRECT_GRPC, oc.PDMESH_HTTP, oc.PDMESH_GRPC, oc.GRPC_FLOOR]
    assert list(arms) == expected
    for name, arm in arms.items():
        # every request answered with the echo of its own prompt (wrong tokens count as failed)
        assert arm["failures"] == 0, (name, arm["first_error"])
        assert arm["requests"] == 2 * (20 + 40)
        assert len(arm["p50_ms"]) == len(arm["req_per_s"]) == 2  # one entry per round
        assert 0 < arm["median_p50_ms"] <= arm["median_p99_ms"]
        assert arm["median_req_per_s"] > 0
    assert arms[oc.PDMESH_GRPC]["baseline"] == oc.DIRECT_GRPC
    assert arms[oc.PDMESH_HTTP]["baseline"] == oc.DIRECT_HTTP
    for routed in (oc.PDMESH_HTTP, oc.PDMESH_GRPC, oc.GRPC_FLOOR):
        assert math.isfinite(arms[routed]["added_p50_ms"])
        assert arms[routed]["median_cpu_us_per_req"] > 0  # the router's own CPU time
    assert arms[oc.DIRECT_GRPC]["median_cpu_us_per_req"] is None or math.isnan(
        arms[oc.DIRECT_GRPC]["median_cpu_us_per_req"]
    )
    table = printed.out
    for label in ("direct gRPC (baseline)", "(c) pdmesh router, gRPC", "skipped:", "floor"):
        assert label in table
    assert "targets: need the sglang-router arm" not in table  # the floor line stands in
    assert "pdmesh's router vs the bare grpc.aio floor" in table


@pytest.mark.skipif(
    not launch.sglang_router_available(), reason="sglang_router not installed (pdmesh[bench])"
)
def test_router_overhead_with_sglang_router(tmp_path: Path) -> None:
    """sglang-router takes the echo workers' SGLang face and returns their echo."""
    cfg = replace(TINY_OVERHEAD, arms=oc.SGLANG, log_dir=str(tmp_path))
    report = overhead.run(cfg)
    assert list(report.arms) == [oc.DIRECT_HTTP, oc.SGLANG]
    assert report.skipped == {}
    runs = report.arms[oc.SGLANG]
    assert runs.failures == 0, runs.first_error
    assert runs.requests == 60 and median(runs.req_per_s) > 0
    assert math.isfinite(report.added(oc.SGLANG, "p50_ms"))
    assert "(c) added p50" not in overhead.render(report)  # no pdmesh arm, no such target


def test_echo_worker_answers_alike_over_grpc_and_http(tmp_path: Path) -> None:
    """The echo worker's two faces give the same ids; a router in front changes nothing, and
    a pdmesh router asked for ids only never needs the tokenizer it was pointed at."""
    prompt = [11, 22, 33]
    with Fleet(tmp_path) as fleet:
        grpc_port, http_port, router_port = free_port(), free_port(), free_port()
        fleet.start(
            "echo",
            [
                "-m",
                "benchmarks.routers.echo_worker",
                "--grpc-port",
                str(grpc_port),
                "--http-port",
                str(http_port),
                "--num-tokens",
                "5",
            ],  # fmt: skip
            f"http://127.0.0.1:{http_port}/health",
        )
        args = launch.pdmesh_router_args([f"127.0.0.1:{grpc_port}"], router_port, "round_robin")
        fleet.start("router", args, f"grpc://127.0.0.1:{router_port}")
        fleet.wait_healthy()

        async def ask() -> list[list[int]]:
            clients = [
                WorkerGrpc(f"127.0.0.1:{grpc_port}", 10),
                HttpGenerate(f"http://127.0.0.1:{http_port}", 10),
                HttpGenerate(f"http://127.0.0.1:{http_port}", 10, stream=True),
                RouterGrpc(f"127.0.0.1:{router_port}", 10),
            ]
            out = []
            for c in clients:
                await c.open()
                try:
                    for _ in range(100):  # the router takes the worker after a health check
                        try:
                            out.append((await c.generate(prompt, 4)).token_ids)
                            break
                        except (RequestFailed, aiohttp.ClientError):
                            await asyncio.sleep(0.1)
                finally:
                    await c.close()
            return out

        replies = asyncio.run(ask())
        # ids only leaves no text to apply stop strings to: refused, naming the field
        with grpc.insecure_channel(f"127.0.0.1:{router_port}") as channel:
            request = router_pb2.RouterGenerateRequest(
                token_ids=router_pb2.TokenIds(ids=prompt),
                sampling_params=common_pb2.SamplingParams(detokenize=False, stop=["x"]),
            )
            with pytest.raises(grpc.RpcError) as refused:
                list(router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=10))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stop strings need text" in (refused.value.details() or "")
    assert replies == [echo_ids(prompt, 5, 4)] * 4 == [[11, 22, 33, 11]] * 4


@pytest.mark.model
def test_routing_quality_without_sglang_router(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Two tenants on two workers at concurrency 1: cache_aware keeps each tenant on one
    worker, so every request but a tenant's first finds its system prompt cached, as the
    workers' own counters and the replies both say."""
    _no_sglang_router(monkeypatch)
    cfg = QualityConfig(
        workers=2,
        num_pages=32,
        tenants=2,
        prompts_per_tenant=3,
        system_prompt_len=32,
        question_len=8,
        output_len=2,
        concurrency=1,
        policies="round_robin,cache_aware",
        log_dir=str(tmp_path),
        progress=False,
    )
    report = quality.run(cfg)
    assert report.skipped == {"sglang-router cache_aware": launch.SGLANG_MISSING}
    assert [a.name for a in report.arms] == ["pdmesh round_robin", "pdmesh cache_aware"]
    for arm in report.arms:
        assert (arm.requests, arm.failures) == (6, 0), arm.first_error
        assert arm.prompt_tokens == 6 * 40
        # the workers' prefix-cache counters and the replies' cached_tokens agree
        assert arm.hit_tokens == arm.reported_cached_tokens
        assert 0 <= arm.hit_rate <= report.best_hit_rate
        assert sum(arm.per_worker.values()) == 6 and len(arm.per_worker) == 2
        assert len(arm.ttft_ms) == 6 and min(arm.ttft_ms) > 0
        assert min(arm.ttft_ms) <= arm.ttft_mean_ms <= max(arm.ttft_ms)
    cache_aware = report.arms[1]
    assert report.best_hit_rate == pytest.approx(2 * 2 * 32 / (6 * 40))
    assert cache_aware.hit_rate == pytest.approx(report.best_hit_rate)
    assert sorted(cache_aware.per_worker.values()) == [3, 3]  # one tenant each
    table = quality.render(report)
    assert "pdmesh cache_aware" in table and "skipped:" in table and "targets:" in table
