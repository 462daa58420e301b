"""``python -m benchmarks vs-smg``: SGLang's gateway (``smg``, gRPC mode) and pdmesh's router +
gateway in front of the very same pdmesh workers, under the same load.

    workers (services.decode x N) ◄── smg launch --worker-urls grpc://... (SGLang's protocol)
                                  ◄── services.router ◄── services.gateway (pdmesh's protocol)

Both arms take OpenAI chat completions over HTTP, tokenize and render the chat template
themselves and stream tokens from the workers over gRPC, so the difference is the gateway and
router. The random workload measures TTFT, ITL and output throughput at each concurrency (closed
loop, ``benchmarks.serve``'s load generator); the shared-prefix workload runs both with
``cache_aware`` and measures the prefix hit rate the workers saw (their prefix-cache hit tokens
over the prompt tokens sent). Every run and arm draws its own prompts, so no arm finds another's
prefixes cached; with ``--repeats`` the arms alternate which goes first. The capacity workload
(``smg_capacity``) measures the hit rate again where KV pages are scarce, on fresh workers for
every arm. Ratios are printed (pdmesh / smg), never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import secrets
import statistics
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.cli import BAD_FLAGS, parse_config, run_or_fail, write_json
from benchmarks.logs import setup_logging
from benchmarks.routers.fleet import ChildDied, Fleet
from benchmarks.serve.backends import make_backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest, random_requests, shared_prefix_requests
from benchmarks.serve.metrics import Summary, summarize
from benchmarks.serve.runner import run_requests, warmup
from benchmarks.serve.tokenizer import BenchTokenizer
from benchmarks.smg_capacity import CapacityReport, render_capacity, run_capacity
from benchmarks.smg_config import SmgBenchConfig
from benchmarks.smg_procs import Worker, start_pdmesh, start_smg, start_tokenizer, wait_ready
from benchmarks.smg_procs import start_workers as start_worker_procs
from pdmesh.config import add_dataclass_args
from pdmesh.models.source import resolve
from pdmesh.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("benchmarks.smg")

PROG = "python -m benchmarks vs-smg"
ARMS = ("pdmesh", "smg")
WARMUP_REQUESTS = 2


@dataclass
class Run:
    """One arm's timed run of one workload at one concurrency."""

    arm: str
    workload: str  # "random" or "shared-prefix"
    concurrency: int
    summary: Summary
    prefix_hit_rate: float | None = None  # shared-prefix: workers' hit tokens / prompt tokens

    def figures(self) -> dict[str, float]:
        s = self.summary
        out = {
            "ttft_p50_ms": s.ttft_ms.p50 if s.ttft_ms else float("nan"),
            "itl_p50_ms": s.itl_ms.p50 if s.itl_ms else float("nan"),
            "output_tok_s": s.output_throughput,
            "failed": float(s.failed),
        }
        if self.prefix_hit_rate is not None:
            out["prefix_hit_rate"] = self.prefix_hit_rate
        return out


@dataclass
class Report:
    config: SmgBenchConfig
    runs: list[Run] = field(default_factory=list)
    capacity: CapacityReport = field(default_factory=CapacityReport)

    def medians(self, arm: str, workload: str, level: int) -> dict[str, float]:
        runs = [
            r.figures()
            for r in self.runs
            if (r.arm, r.workload, r.concurrency) == (arm, workload, level)
        ]
        return {k: statistics.median(f[k] for f in runs) for k in runs[0]} if runs else {}


# -- processes ---------------------------------------------------------------------------------


def start_workers(cfg: SmgBenchConfig, fleet: Fleet) -> list[Worker]:
    """The ``--workers`` workers the random and shared-prefix workloads share."""
    return start_worker_procs(
        fleet,
        count=cfg.workers,
        model=cfg.model,
        device=cfg.device,
        num_pages=cfg.num_pages,
        max_model_len=cfg.max_model_len,
    )


def start_arms(
    cfg: SmgBenchConfig, fleet: Fleet, tokenizer: str, workers: list[str], policy: str
) -> tuple[dict[str, str], list[Any]]:
    """pdmesh's router + gateway and smg, both with ``policy``: base URLs by arm, children."""
    pdmesh_url, pdmesh_children = start_pdmesh(fleet, tokenizer, workers, policy)
    smg_url, smg_children = start_smg(
        fleet, cfg.model, workers, policy, extra_args=cfg.smg_arg_list()
    )
    wait_ready(fleet, pdmesh_url, pdmesh_children, len(workers))
    wait_ready(fleet, smg_url, smg_children, len(workers))
    urls = {"pdmesh": pdmesh_url, "smg": smg_url}
    return urls, [*pdmesh_children, *smg_children]


# -- measuring ---------------------------------------------------------------------------------


def serve_config(cfg: SmgBenchConfig, url: str, concurrency: int) -> ServeBenchConfig:
    return ServeBenchConfig(
        backend="openai-chat",
        base_url=url,
        ignore_eos=True,
        temperature=0.0,
        max_concurrency=concurrency,
        request_timeout=cfg.request_timeout,
        progress=cfg.progress,
    )


async def timed(
    cfg: SmgBenchConfig,
    url: str,
    requests: list[BenchRequest],
    concurrency: int,
    workers: list[str] | None = None,
) -> tuple[Summary, int]:
    """The timed run's summary, and (with ``workers``) the prefix-cache hit tokens the
    workers counted during it (not during the warmup)."""
    backend = make_backend(serve_config(cfg, url, concurrency))
    run_id = secrets.token_hex(3)
    async with backend:
        warm = await warmup(backend, requests[0], WARMUP_REQUESTS, run_id)
        if not any(r.success for r in warm):
            raise RuntimeError(f"every warmup request to {url} failed: {warm[0].error}")
        before = prefix_hit_tokens(workers) if workers else 0
        run = await run_requests(
            backend, requests, [0.0] * len(requests), concurrency, run_id, cfg.progress
        )
        hits = prefix_hit_tokens(workers) - before if workers else 0
    return summarize(run.results, run.duration_s, max_in_flight=run.max_in_flight), hits


def prefix_hit_tokens(workers: list[str]) -> int:
    total = 0
    for address in workers:
        with grpc.insecure_channel(address) as channel:
            load = worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(), timeout=10
            )
        total += load.prefix_hit_tokens
    return total


def order(repeat: int) -> tuple[str, ...]:
    """The arms in the order they run in ``repeat`` (alternating, so neither always goes
    first on a machine that warms up or slows down)."""
    return ARMS if repeat % 2 == 0 else ARMS[::-1]


def run(cfg: SmgBenchConfig, tokenizer: BenchTokenizer, report: Report) -> None:
    log_dir = Path(cfg.log_dir) if cfg.log_dir else None
    with Fleet(log_dir, cfg.startup_timeout) as fleet:
        tok = start_tokenizer(fleet, cfg.model)
        fleet.wait_healthy()
        log.info("logs in %s", fleet.log_dir)
        if cfg.random_workload or cfg.shared_prefix:
            workers = start_workers(cfg, fleet)
            addresses = [w.address for w in workers]
            log.info("workers up: %s", ", ".join(addresses))
            run_shared_workers(cfg, fleet, tok, addresses, tokenizer, report)
            fleet.stop_children([w.child for w in workers])  # the capacity workload has its own
        if cfg.capacity:
            run_capacity(cfg, fleet, tok, tokenizer, report.capacity)


def run_shared_workers(
    cfg: SmgBenchConfig,
    fleet: Fleet,
    tok: str,
    workers: list[str],
    tokenizer: BenchTokenizer,
    report: Report,
) -> None:
    """The random and shared-prefix workloads, on the same long-lived workers."""
    if cfg.random_workload:
        urls, arms = start_arms(cfg, fleet, tok, workers, cfg.policy)
        for repeat in range(cfg.repeats):
            for level in cfg.levels():
                n = max(8, level * cfg.requests_per_client)
                for i, arm in enumerate(order(repeat)):
                    rng = np.random.default_rng([cfg.seed, repeat, level, i])
                    requests = random_requests(
                        tokenizer, rng, n, cfg.input_len, cfg.output_len, 0.0, False
                    )
                    log.info("random workload, concurrency %d: %s (%d requests)", level, arm, n)
                    summary, _ = asyncio.run(timed(cfg, urls[arm], requests, level))
                    report.runs.append(Run(arm, "random", level, summary))
        fleet.stop_children(arms)
    if cfg.shared_prefix:
        urls, arms = start_arms(cfg, fleet, tok, workers, "cache_aware")
        for repeat in range(cfg.repeats):
            for i, arm in enumerate(order(repeat)):
                rng = np.random.default_rng([cfg.seed, repeat, 1_000_003, i])
                requests = shared_prefix_requests(
                    tokenizer, rng, cfg.num_groups, cfg.prompts_per_group,
                    cfg.system_prompt_len, cfg.question_len, cfg.shared_output_len, False,
                )  # fmt: skip
                log.info("shared-prefix workload: %s (%d requests)", arm, len(requests))
                summary, hits = asyncio.run(
                    timed(cfg, urls[arm], requests, cfg.shared_concurrency, workers)
                )
                rate = hits / max(summary.total_input_tokens, 1)
                report.runs.append(Run(arm, "shared-prefix", cfg.shared_concurrency, summary, rate))
        fleet.stop_children(arms)


# -- report ------------------------------------------------------------------------------------


def render(report: Report) -> str:
    cfg = report.config
    shared = f"{cfg.workers} workers, " if cfg.random_workload or cfg.shared_prefix else ""
    lines = [
        f"pdmesh router+gateway vs smg (gRPC mode), {shared}{cfg.model} on {cfg.device}, "
        f"medians of {cfg.repeats} run(s); ratio = pdmesh / smg",
    ]
    if cfg.random_workload:
        lines += [
            "",
            f"random workload: {cfg.input_len} prompt + {cfg.output_len} output tokens, "
            f"policy {cfg.policy}",
            f"{'conc':>5} {'arm':>7} {'TTFT p50 ms':>12} {'ITL p50 ms':>11} {'out tok/s':>10} "
            f"{'failed':>7}",
        ]
    for level in cfg.levels() if cfg.random_workload else []:
        figures = {arm: report.medians(arm, "random", level) for arm in ARMS}
        for arm in ARMS:
            f = figures[arm]
            lines.append(
                f"{level:>5} {arm:>7} {f['ttft_p50_ms']:>12.1f} {f['itl_p50_ms']:>11.1f} "
                f"{f['output_tok_s']:>10.1f} {f['failed']:>7.0f}"
            )
        p, s = figures["pdmesh"], figures["smg"]
        lines.append(
            f"{level:>5} {'ratio':>7} {_ratio(p, s, 'ttft_p50_ms'):>12} "
            f"{_ratio(p, s, 'itl_p50_ms'):>11} {_ratio(p, s, 'output_tok_s'):>10}"
        )
    if cfg.shared_prefix:
        lines += [
            "",
            f"shared-prefix workload: {cfg.num_groups} system prompts of "
            f"{cfg.system_prompt_len} tokens x {cfg.prompts_per_group} questions of "
            f"{cfg.question_len}, concurrency {cfg.shared_concurrency}, policy cache_aware",
            f"{'arm':>7} {'hit rate':>9} {'TTFT p50 ms':>12} {'out tok/s':>10} {'failed':>7}",
        ]
        figures = {
            arm: report.medians(arm, "shared-prefix", cfg.shared_concurrency) for arm in ARMS
        }
        for arm in ARMS:
            f = figures[arm]
            lines.append(
                f"{arm:>7} {f['prefix_hit_rate']:>9.3f} {f['ttft_p50_ms']:>12.1f} "
                f"{f['output_tok_s']:>10.1f} {f['failed']:>7.0f}"
            )
        p, s = figures["pdmesh"], figures["smg"]
        lines.append(
            f"{'ratio':>7} {_ratio(p, s, 'prefix_hit_rate'):>9} {_ratio(p, s, 'ttft_p50_ms'):>12} "
            f"{_ratio(p, s, 'output_tok_s'):>10}"
        )
    if cfg.capacity:
        lines += ["", *render_capacity(cfg, report.capacity)]
    lines += [
        "",
        "cache_aware: each router's defaults (cache threshold 0.3, balance thresholds 64 "
        "requests and 1.5x in both; smg's other settings, e.g. its worker overload protection "
        "and warm-up slice, at their defaults too)",
    ]
    if cfg.smg_args:
        lines.append(f"smg was also given: {cfg.smg_args}")
    return "\n".join(lines)


def _ratio(p: dict[str, float], s: dict[str, float], key: str) -> str:
    return f"{p[key] / s[key]:.3f}" if s.get(key) else "n/a"


def to_json(report: Report) -> dict[str, Any]:
    return {
        "config": dataclasses.asdict(report.config),
        "runs": [
            {"arm": r.arm, "workload": r.workload, "concurrency": r.concurrency, **r.figures()}
            for r in report.runs
        ],
        "capacity_runs": [r.figures() for r in report.capacity.runs],
    }


# -- command line ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "SGLang's gateway smg (gRPC mode) against pdmesh's router + gateway, both in front "
            "of the same pdmesh workers: TTFT, ITL and output throughput at each concurrency "
            "on a random workload, and the workers' prefix hit rate with cache_aware routing "
            "on both: on a shared-prefix workload whose prefixes all fit the workers' caches, "
            "and on the capacity workload, where they do not (fresh workers per arm, the same "
            "requests through each). Prints medians and pdmesh/smg ratios.",
            width=88,
        ),
    )
    add_dataclass_args(parser, SmgBenchConfig)
    return parser


def main(argv: list[str] | None = None, out: Callable[[str], Any] = print) -> int:
    cfg = parse_config(build_parser(), SmgBenchConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    setup_logging()
    source = resolve(cfg.model)
    if source.path is None:
        print(f"error: --model={cfg.model!r} has no tokenizer files", file=sys.stderr)
        return 2
    report = Report(cfg)
    tokenizer = str(source.path)
    failed = run_or_fail(
        lambda: run(cfg, BenchTokenizer.from_path(tokenizer), report),
        (ChildDied, RuntimeError, ValueError),
    )
    if failed is not None:
        return failed
    out(render(report))
    if cfg.json_out:
        write_json(cfg.json_out, to_json(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
