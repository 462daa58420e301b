"""``python -m benchmarks routing-quality``: how well each routing policy keeps shared
prefixes where they are cached, side by side with sglang-router.

``--workers`` real engine workers (``services.decode``, CPU, small KV pools so that eviction
matters) serve benchmarks.serve's shared-prefix multi-tenant workload (``--tenants`` system
prompts, ``--prompts-per-tenant`` questions each, interleaved) as token ids, with greedy
``--output-len``-token answers, at ``--concurrency``. One arm per pdmesh router policy (a fresh
``services.router`` each), and one for sglang-router (``--sglang-policy``) in front of the same
engines through ``sglang_shim`` (SGLang's HTTP API over each worker's gRPC; one HTTP hop more).

Per arm: the prefix hit rate (prompt tokens the workers served from their prefix caches, from
the deltas of their ``GetLoad.prefix_hit_tokens`` counters, over prompt tokens sent), mean and
p99 time to first token, and max/min requests per worker. Each arm draws its own tenants (same
shape, new ids), so no arm finds another's prefixes cached; arms run one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc.aio
import numpy as np
from tqdm import tqdm

from benchmarks.cli import BAD_FLAGS, parse_config, write_json
from benchmarks.host import loadavg
from benchmarks.logs import setup_logging
from benchmarks.routers import launch
from benchmarks.routers.fleet import Child, ChildDied, Fleet, free_port
from benchmarks.routers.launch import SGLANG_MISSING, pdmesh_router_args, sglang_router_args
from benchmarks.routers.loadgen import Client, HttpGenerate, Phase, RouterGrpc, closed_loop
from benchmarks.routers.quality_config import DEFAULT_MODEL, QualityConfig
from benchmarks.routers.quality_report import render
from benchmarks.routers.stats import percentile
from benchmarks.serve.datasets import shared_prefix_requests
from benchmarks.serve.tokenizer import TokenizerLike, load_tokenizer
from pdmesh.config import add_dataclass_args
from pdmesh.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("benchmarks.routing_quality")

PROG = "python -m benchmarks routing-quality"
SAMPLING = {"temperature": 0.0, "ignore_eos": True}  # greedy, exact output lengths
RPC_TIMEOUT_S = 10.0


@dataclass
class ArmResult:
    router: str  # "pdmesh" | "sglang-router"
    policy: str
    requests: int = 0
    failures: int = 0
    first_error: str = ""
    prompt_tokens: int = 0  # of the requests that completed
    hit_tokens: int = 0  # the workers' prefix-cache hits over the arm (their own counters)
    reported_cached_tokens: int = 0  # the same as the replies report it (cross-check)
    ttft_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    per_worker: dict[str, int] = field(default_factory=dict)  # requests each worker served

    @property
    def name(self) -> str:
        return f"{self.router} {self.policy}"

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else float("nan")

    @property
    def ttft_mean_ms(self) -> float:
        return float(np.mean(self.ttft_ms)) if self.ttft_ms else float("nan")

    @property
    def ttft_p99_ms(self) -> float:
        return percentile(self.ttft_ms, 99)

    @property
    def max_min_load(self) -> float:
        counts = list(self.per_worker.values())
        if not counts:
            return float("nan")
        return max(counts) / min(counts) if min(counts) else float("inf")

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("ttft_ms")
        return {
            **out,
            "hit_rate": self.hit_rate,
            "ttft_mean_ms": self.ttft_mean_ms,
            "ttft_p99_ms": self.ttft_p99_ms,
            "max_min_load": self.max_min_load,
        }


@dataclass
class Report:
    config: dict[str, Any]
    arms: list[ArmResult]
    best_hit_rate: float  # every tenant's first request misses, page granularity
    skipped: dict[str, str]
    environment: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "best_hit_rate": self.best_hit_rate,
            "skipped": self.skipped,
            "environment": self.environment,
            "arms": [a.summary() for a in self.arms],
        }


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
    add_dataclass_args(parser, QualityConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(build_parser(), QualityConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    setup_logging(progress=False)
    try:
        report = run(cfg)
    except (ChildDied, OSError, ValueError) as e:  # a process that died; a bad --tokenizer
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(render(report))
    if cfg.json_out:
        write_json(cfg.json_out, report.to_json())
        print(f"wrote {cfg.json_out}")
    return 1 if any(a.failures for a in report.arms) else 0


def run(cfg: QualityConfig) -> Report:
    skipped: dict[str, str] = {}
    arms = [("pdmesh", p) for p in cfg.policy_list()]
    if cfg.sglang_policy:
        if not launch.sglang_router_available():
            skipped[f"sglang-router {cfg.sglang_policy}"] = SGLANG_MISSING
            print(f"skipping sglang-router: {SGLANG_MISSING}", file=sys.stderr)
        else:
            arms.append(("sglang-router", cfg.sglang_policy))
    if cfg.model == DEFAULT_MODEL:
        from pdmesh.models.fetch import ensure_default_model

        ensure_default_model()  # once here, rather than in every worker at the same time
    tokenizer = load_tokenizer(cfg.tokenizer)
    env = {"cpus": os.cpu_count(), "loadavg_1min_at_start": loadavg()}
    with Fleet(Path(cfg.log_dir) if cfg.log_dir else None, cfg.startup_timeout) as fleet:
        workers = start_workers(cfg, fleet)
        results = asyncio.run(measure(cfg, fleet, workers, arms, tokenizer))
    env["loadavg_1min_at_end"] = loadavg()
    return Report(asdict(cfg), results, best_hit_rate(cfg), skipped, env)


def best_hit_rate(cfg: QualityConfig) -> float:
    """The hit rate of a perfect router with endless caches: every request but each tenant's
    first finds its system prompt's whole pages cached (a question is never shared)."""
    cached = (cfg.system_prompt_len // cfg.page_size) * cfg.page_size
    hits = cfg.tenants * (cfg.prompts_per_tenant - 1) * cached
    return hits / (cfg.tenants * cfg.prompts_per_tenant * cfg.prompt_len)


def start_workers(cfg: QualityConfig, fleet: Fleet) -> list[str]:
    addresses = []
    for i in range(cfg.workers):
        port = free_port()
        args = [
            "-m", "services.decode",
            "--port", str(port),
            "--model", cfg.model,
            "--device", cfg.device,
            "--num-pages", str(cfg.num_pages),
            "--page-size", str(cfg.page_size),
            "--max-model-len", str(cfg.max_model_len),
            "--log-level", "warning",
            "--grace-period", "2",
        ]  # fmt: skip
        fleet.start(f"worker-{i}", args, f"grpc://127.0.0.1:{port}")
        addresses.append(f"127.0.0.1:{port}")
    fleet.wait_healthy()
    return addresses


async def measure(
    cfg: QualityConfig,
    fleet: Fleet,
    workers: list[str],
    arms: list[tuple[str, str]],
    tokenizer: TokenizerLike,
) -> list[ArmResult]:
    channels = [grpc.aio.insecure_channel(a) for a in workers]
    stubs = {a: worker_pb2_grpc.WorkerServiceStub(c) for a, c in zip(workers, channels)}
    per_arm = cfg.tenants * cfg.prompts_per_tenant
    results = []
    try:
        await _warm_up(cfg, stubs, tokenizer)
        with tqdm(
            total=per_arm * len(arms), desc="routing-quality", unit="req", disable=not cfg.progress
        ) as bar:
            for i, (router, policy) in enumerate(arms):
                bar.set_postfix_str(f"{router} {policy}")
                requests = shared_prefix_requests(
                    tokenizer,
                    np.random.default_rng([cfg.seed, i]),  # each arm its own tenants
                    cfg.tenants,
                    cfg.prompts_per_tenant,
                    cfg.system_prompt_len,
                    cfg.question_len,
                    cfg.output_len,
                    as_ids=True,
                )
                prompts = [_ids(r.full_prompt()) for r in requests]
                result = ArmResult(router, policy)
                procs, client = start_arm(cfg, fleet, workers, router, policy)
                try:
                    await client.open()
                    await _until_ready(client, tokenizer, cfg, fleet)
                    before = await _hit_tokens(stubs)
                    phase = await closed_loop(
                        client,
                        prompts,
                        cfg.output_len,
                        cfg.concurrency,
                        lambda: bar.update(),
                    )
                    after = await _hit_tokens(stubs)
                finally:
                    await client.close()
                    fleet.stop_children(procs)
                _fill(result, phase, prompts, workers, after - before)
                results.append(result)
    finally:
        for channel in channels:
            await channel.close()
    return results


def start_arm(
    cfg: QualityConfig, fleet: Fleet, workers: list[str], router: str, policy: str
) -> tuple[list[Child], Client]:
    """Start the arm's router (and, for sglang-router, a shim per worker); its client."""
    timeout = cfg.request_timeout
    if router == "pdmesh":
        port = free_port()
        args = pdmesh_router_args(workers, port, policy)
        child = fleet.start(f"router-{policy}", args, f"grpc://127.0.0.1:{port}")
        fleet.wait_healthy([child])
        return [child], RouterGrpc(f"127.0.0.1:{port}", timeout, SAMPLING)
    shims, urls = [], []
    for i, address in enumerate(workers):
        port = free_port()
        args = ["-m", "benchmarks.routers.sglang_shim", "--worker", address, "--port", str(port)]
        shims.append(fleet.start(f"shim-{i}", args, f"http://127.0.0.1:{port}/health"))
        urls.append(f"http://127.0.0.1:{port}")
    fleet.wait_healthy(shims)  # sglang-router re-checks a worker it found down only every 30 s
    port = free_port()
    args = sglang_router_args(urls, port, policy)
    child = fleet.start("sglang-router", args, f"http://127.0.0.1:{port}/health")
    fleet.wait_healthy([child])
    return [*shims, child], HttpGenerate(f"http://127.0.0.1:{port}", timeout, True, SAMPLING)


async def _warm_up(
    cfg: QualityConfig,
    stubs: dict[str, worker_pb2_grpc.WorkerServiceStub],
    tokenizer: TokenizerLike,
) -> None:
    """One short request per worker, straight to it, so no arm pays a cold engine's first
    step (its prompt shares nothing with the workload's)."""
    rng = np.random.default_rng([cfg.seed, 1 << 20])
    ids = [int(x) for x in rng.choice(tokenizer.sampleable_ids(), size=cfg.question_len)]
    for i, stub in enumerate(stubs.values()):
        request = worker_pb2.GenerateRequest(
            request_id=f"warmup-{i}",
            token_ids=ids,
            sampling_params={"max_new_tokens": 2, **SAMPLING},
        )
        async for _ in stub.Generate(request, timeout=cfg.request_timeout):
            pass


async def _until_ready(
    client: Client, tokenizer: TokenizerLike, cfg: QualityConfig, fleet: Fleet
) -> None:
    """One short request through the arm's router that succeeds (a router may still be
    registering its workers), retried until --startup-timeout. Its prompt shares nothing with
    the workload's, and it is done before the hit counters are read."""
    rng = np.random.default_rng([cfg.seed, 1 << 21])
    prompt = [int(x) for x in rng.choice(tokenizer.sampleable_ids(), size=4)]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.startup_timeout
    while True:
        phase = await closed_loop(client, [prompt], 1, 1)
        if phase.replies:
            return
        fleet.check_alive()
        if loop.time() > deadline:
            raise ChildDied(f"no request through the router succeeded: {phase.first_error}")
        await asyncio.sleep(0.2)


async def _hit_tokens(stubs: dict[str, worker_pb2_grpc.WorkerServiceStub]) -> int:
    """Prompt tokens all workers have served from their prefix caches since they started."""
    loads = await asyncio.gather(
        *(s.GetLoad(worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S) for s in stubs.values())
    )
    return sum(int(load.prefix_hit_tokens) for load in loads)


def _fill(
    result: ArmResult, phase: Phase, prompts: list[list[int]], workers: list[str], hits: int
) -> None:
    result.requests = len(prompts)
    result.failures = phase.failures
    result.first_error = phase.first_error
    result.wall_s = phase.wall_s
    result.hit_tokens = hits
    replies = phase.replies
    result.prompt_tokens = sum(len(prompts[i]) for i in replies)
    result.reported_cached_tokens = sum(r.cached_tokens for r in replies.values())
    result.ttft_ms = [r.ttft_s * 1000 for r in replies.values() if r.ttft_s is not None]
    served = Counter(r.worker for r in replies.values())
    result.per_worker = {w: served.get(w, 0) for w in workers}
    unknown = sum(n for w, n in served.items() if w not in result.per_worker)
    if unknown:
        result.per_worker["(unnamed)"] = unknown


def _ids(prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):  # as_ids=True gives ids; a text prompt here is a bug
        raise TypeError("the shared-prefix dataset gave text where token ids were asked")
    return prompt


if __name__ == "__main__":
    sys.exit(main())
