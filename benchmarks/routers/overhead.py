"""``python -m benchmarks router-overhead``: what a router adds to a request, side by side.

The same ``--workers`` echo workers (``echo_worker``: pdmesh's WorkerService and SGLang's HTTP
API in one process, answering identically and at once) are called

- directly, over HTTP (``direct-http``) and over gRPC (``direct-grpc``): the baselines;
- through sglang-router (HTTP ``/generate``), the peer router (``sglang-router``);
- through the pdmesh gateway and router (HTTP ``/generate``, ``pdmesh-http``);
- through the pdmesh router alone (``RouterService.Generate``, ``pdmesh-grpc``);
- through ``floor_proxy``, a bare ``grpc.aio`` pass-through (``grpc-floor``): the least any
  Python gRPC hop costs, so the report tells pdmesh's own share from the transport's.

Prompts are token ids and every request asks for ids only (``detokenize: false``): no arm
involves a tokenizer. For each arm and round: ``--latency-requests`` one at a time (p50/p99),
then ``--throughput-requests`` at ``--concurrency`` (req/s). "Added" latency is an arm's figure
minus its baseline's (same transport, same round); the report gives medians over the rounds and
the ratios against sglang-router. Nothing is asserted: the figures are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import os
import platform
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from benchmarks.cli import BAD_FLAGS, parse_config, write_json
from benchmarks.host import loadavg
from benchmarks.logs import setup_logging
from benchmarks.routers import launch
from benchmarks.routers import overhead_config as oc
from benchmarks.routers.echo_worker import echo_ids
from benchmarks.routers.fleet import Child, ChildDied, Fleet, free_port
from benchmarks.routers.launch import SGLANG_MISSING, pdmesh_router_args, sglang_router_args
from benchmarks.routers.loadgen import (
    Client,
    HttpGenerate,
    ManyClients,
    Phase,
    RouterGrpc,
    WorkerGrpc,
    closed_loop,
)
from benchmarks.routers.overhead_report import render
from benchmarks.routers.stats import median, percentile
from pdmesh.config import add_dataclass_args

log = logging.getLogger("benchmarks.router_overhead")

PROG = "python -m benchmarks router-overhead"
VOCAB = 49152
BASELINE = {
    oc.SGLANG: oc.DIRECT_HTTP,
    oc.PDMESH_HTTP: oc.DIRECT_HTTP,
    oc.PDMESH_GRPC: oc.DIRECT_GRPC,
    oc.GRPC_FLOOR: oc.DIRECT_GRPC,
}


@dataclass
class Arm:
    """How to reach one arm, and the processes its requests pass through besides the worker
    (whose CPU time is the arm's cost per request)."""

    client: Client
    path: list[Child] = field(default_factory=list)

    def cpu_seconds(self) -> float:
        return sum(c.cpu_seconds() for c in self.path) if self.path else float("nan")


@dataclass
class ArmRuns:
    """One arm's figures, one entry per round."""

    arm: str
    baseline: str | None
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    req_per_s: list[float] = field(default_factory=list)
    # CPU time of the arm's own processes (routers, gateway) per request, both phases
    cpu_us_per_req: list[float] = field(default_factory=list)
    requests: int = 0
    failures: int = 0
    first_error: str = ""

    def record(self, latency: Phase, throughput: Phase, wrong: int, cpu_s: float) -> None:
        lat_ms = [r.latency_s * 1000 for r in latency.replies.values()]
        self.p50_ms.append(percentile(lat_ms, 50))
        self.p99_ms.append(percentile(lat_ms, 99))
        self.req_per_s.append(throughput.requests_per_s)
        done = len(latency.replies) + len(throughput.replies)
        self.cpu_us_per_req.append(cpu_s * 1e6 / done if done else float("nan"))
        self.requests += done
        self.failures += latency.failures + throughput.failures + wrong
        self.first_error = self.first_error or latency.first_error or throughput.first_error
        if wrong and not self.first_error:
            self.first_error = f"{wrong} replies had other tokens than the echo"


@dataclass
class Report:
    config: dict[str, Any]
    environment: dict[str, Any]
    arms: dict[str, ArmRuns]
    skipped: dict[str, str]  # arm -> why it did not run

    def added(self, arm: str, stat: str) -> float:
        """Median over rounds of (arm - its baseline) for ``stat`` ("p50_ms" | "p99_ms")."""
        runs = self.arms.get(arm)
        if runs is None or runs.baseline not in self.arms:
            return float("nan")
        base = getattr(self.arms[runs.baseline], stat)
        return median([a - b for a, b in zip(getattr(runs, stat), base)])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "config": self.config,
            "environment": self.environment,
            "skipped": self.skipped,
            "arms": {},
        }
        for name, runs in self.arms.items():
            out["arms"][name] = {
                **asdict(runs),
                "median_p50_ms": median(runs.p50_ms),
                "median_p99_ms": median(runs.p99_ms),
                "median_req_per_s": median(runs.req_per_s),
                "median_cpu_us_per_req": median(runs.cpu_us_per_req),
                "added_p50_ms": self.added(name, "p50_ms"),
                "added_p99_ms": self.added(name, "p99_ms"),
            }
        return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "sglang-router comes from PyPI (pip install 'pdmesh[bench]', or make bench-router); "
            "without it that arm is skipped with a message."
        ),
    )
    add_dataclass_args(parser, oc.OverheadConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(build_parser(), oc.OverheadConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    setup_logging(progress=False)
    try:
        report = run(cfg)
    except ChildDied as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render(report))
    if cfg.json_out:
        write_json(cfg.json_out, report.to_json())
        print(f"wrote {cfg.json_out}")
    failed = sum(r.failures for r in report.arms.values())
    return 1 if failed else 0


def run(cfg: oc.OverheadConfig) -> Report:
    arms = cfg.arm_list()
    skipped: dict[str, str] = {}
    if oc.SGLANG in arms and not launch.sglang_router_available():
        skipped[oc.SGLANG] = SGLANG_MISSING
        arms.remove(oc.SGLANG)
        print(f"skipping {oc.SGLANG}: {skipped[oc.SGLANG]}", file=sys.stderr)
    env = environment()
    with Fleet(Path(cfg.log_dir) if cfg.log_dir else None, cfg.startup_timeout) as fleet:
        started = start_arms(cfg, fleet, arms)
        results = asyncio.run(measure(cfg, started, fleet))
    env["loadavg_1min_at_end"] = loadavg()
    return Report(asdict(cfg), env, results, skipped)


def start_arms(cfg: oc.OverheadConfig, fleet: Fleet, arms: list[str]) -> dict[str, Arm]:
    """Start the workers and the routers ``arms`` need; how to reach each arm."""
    http_urls, grpc_addrs = [], []
    for i in range(cfg.workers):
        grpc_port, http_port = free_port(), free_port()
        args = [
            "-m", "benchmarks.routers.echo_worker",
            "--grpc-port", str(grpc_port),
            "--http-port", str(http_port),
            "--num-tokens", str(cfg.num_tokens),
        ]  # fmt: skip
        fleet.start(f"echo-{i}", args, f"http://127.0.0.1:{http_port}/health")
        http_urls.append(f"http://127.0.0.1:{http_port}")
        grpc_addrs.append(f"127.0.0.1:{grpc_port}")
    fleet.wait_healthy()  # sglang-router re-checks a worker it found down only every 30 s
    t = cfg.request_timeout
    started: dict[str, Arm] = {
        oc.DIRECT_HTTP: Arm(ManyClients([HttpGenerate(u, t) for u in http_urls])),
        oc.DIRECT_GRPC: Arm(ManyClients([WorkerGrpc(a, t) for a in grpc_addrs])),
    }
    if oc.SGLANG in arms:
        port = free_port()
        args = sglang_router_args(http_urls, port, cfg.policy)
        child = fleet.start("sglang-router", args, f"http://127.0.0.1:{port}/health")
        started[oc.SGLANG] = Arm(HttpGenerate(f"http://127.0.0.1:{port}", t), [child])
    if oc.PDMESH_HTTP in arms or oc.PDMESH_GRPC in arms:
        port = free_port()
        args = pdmesh_router_args(grpc_addrs, port, cfg.policy)
        router_proc = fleet.start("pdmesh-router", args, f"grpc://127.0.0.1:{port}")
        router = f"127.0.0.1:{port}"
        started[oc.PDMESH_GRPC] = Arm(RouterGrpc(router, t), [router_proc])
        if oc.PDMESH_HTTP in arms:
            gw_port = free_port()
            args = [
                "-m", "services.gateway",
                "--port", str(gw_port),
                "--router", router,
                "--model-name", "echo",
                "--log-level", "warning",
            ]  # fmt: skip
            gateway = fleet.start("pdmesh-gateway", args, f"http://127.0.0.1:{gw_port}/health")
            started[oc.PDMESH_HTTP] = Arm(
                HttpGenerate(f"http://127.0.0.1:{gw_port}", t), [gateway, router_proc]
            )
    if oc.GRPC_FLOOR in arms:
        port = free_port()
        args = [
            "-m", "benchmarks.routers.floor_proxy",
            "--port", str(port),
            "--workers", ",".join(grpc_addrs),
        ]  # fmt: skip
        child = fleet.start("grpc-floor", args, f"grpc://127.0.0.1:{port}")
        started[oc.GRPC_FLOOR] = Arm(RouterGrpc(f"127.0.0.1:{port}", t), [child])
    fleet.wait_healthy()
    return {arm: started[arm] for arm in arms}


async def measure(cfg: oc.OverheadConfig, arms: dict[str, Arm], fleet: Fleet) -> dict[str, ArmRuns]:
    rng = random.Random(cfg.seed)
    lat_prompts = _prompts(rng, cfg.latency_requests, cfg.prompt_len)
    thr_prompts = _prompts(rng, cfg.throughput_requests, cfg.prompt_len)
    warm_prompts = _prompts(rng, max(cfg.warmup_requests, 1), cfg.prompt_len)
    clients = {name: arm.client for name, arm in arms.items()}
    names = list(clients)
    runs = {a: ArmRuns(a, BASELINE.get(a)) for a in names}
    per_round = cfg.latency_requests + cfg.throughput_requests
    total = len(names) * (cfg.warmup_requests + cfg.repeats * per_round)
    for client in clients.values():
        await client.open()
    try:
        with tqdm(total=total, desc="router-overhead", unit="req", disable=not cfg.progress) as bar:
            for arm, client in clients.items():
                bar.set_postfix_str(f"{arm} warmup")
                await _until_ready(client, warm_prompts[0], cfg, arm, fleet)
                if cfg.warmup_requests:
                    await closed_loop(
                        client, warm_prompts, cfg.num_tokens, cfg.concurrency, _tick(bar)
                    )
            for r in range(cfg.repeats):
                for arm in names if r % 2 == 0 else reversed(names):
                    fleet.check_alive()
                    client = clients[arm]
                    cpu_before = arms[arm].cpu_seconds()
                    bar.set_postfix_str(f"{arm} round {r + 1} c=1")
                    lat = await closed_loop(client, lat_prompts, cfg.num_tokens, 1, _tick(bar))
                    bar.set_postfix_str(f"{arm} round {r + 1} c={cfg.concurrency}")
                    thr = await closed_loop(
                        client, thr_prompts, cfg.num_tokens, cfg.concurrency, _tick(bar)
                    )
                    cpu = arms[arm].cpu_seconds() - cpu_before
                    wrong = _wrong(lat, lat_prompts, cfg.num_tokens)
                    wrong += _wrong(thr, thr_prompts, cfg.num_tokens)
                    runs[arm].record(lat, thr, wrong, cpu)
    finally:
        for client in clients.values():
            await client.close()
    return runs


async def _until_ready(
    client: Client, prompt: list[int], cfg: oc.OverheadConfig, arm: str, fleet: Fleet
) -> None:
    """A first request that succeeds (a router may still be registering its workers when its
    health check already answers), retried until --startup-timeout."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.startup_timeout
    while True:
        phase = await closed_loop(client, [prompt], cfg.num_tokens, 1)
        if phase.replies:
            return
        fleet.check_alive()
        if loop.time() > deadline:
            raise ChildDied(
                f"{arm}: no request succeeded within --startup-timeout: {phase.first_error}"
            )
        await asyncio.sleep(0.2)


def _prompts(rng: random.Random, n: int, length: int) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(length)] for _ in range(n)]


def _wrong(phase: Phase, prompts: list[list[int]], num_tokens: int) -> int:
    """Replies whose tokens are not the echo of their prompt."""
    return sum(
        1 for i, r in phase.replies.items() if r.token_ids != echo_ids(prompts[i], num_tokens, None)
    )


def _tick(bar: tqdm[Any]) -> Callable[[], None]:
    return lambda: bar.update()


def environment() -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for package in ("sglang-router", "grpcio", "aiohttp", "fastapi", "uvicorn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_1min_at_start": loadavg(),
        **versions,
    }


if __name__ == "__main__":
    sys.exit(main())
