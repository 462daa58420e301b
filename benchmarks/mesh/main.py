"""``python -m benchmarks mesh``: the token path, measured arm by arm in one run.

    load generator ──► worker                                   (1) direct
                   ──► router ──► worker                        (2) router-ids, (3) router-text
                   ──► gateway ──► router ──► worker            (4) gateway (OpenAI chat, SSE)
                   ──► smg ──► worker                           (5) smg (SGLang's gateway)

The worker is the model-free stepping worker (real servicer, one token per active request per
step) or the real ``services.decode``; the tokenizer, router and gateway are the real services,
all on free loopback ports. Per arm and concurrency: output tok/s against the ideal, ITL, TTFT,
and every process's CPU per streamed token.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from benchmarks.cli import BAD_FLAGS, parse_config, run_or_fail
from benchmarks.host import loadavg
from benchmarks.logs import setup_logging
from benchmarks.mesh.arms import ARMS, Arm
from benchmarks.mesh.config import MeshBenchConfig
from benchmarks.mesh.cpu import LOADGEN, CpuUsage, sample
from benchmarks.mesh.load import run_arm, split
from benchmarks.mesh.procs import Mesh, start_mesh
from benchmarks.mesh.prompts import load_tokenizer, prompt_pool
from benchmarks.mesh.report import ArmRun, Report, render, write_json
from benchmarks.mesh.steady import steady_rate
from benchmarks.routers.fleet import ChildDied, Fleet
from benchmarks.serve.metrics import summarize
from benchmarks.serve.tokenizer import TokenizerLike
from pdmesh.config import add_dataclass_args

log = logging.getLogger("benchmarks.mesh")

PROG = "python -m benchmarks mesh"


def measure(
    cfg: MeshBenchConfig, mesh: Mesh, arm: Arm, concurrency: int, tokenizer: TokenizerLike
) -> ArmRun:
    """One arm at one concurrency, with every process's CPU over the same window."""
    pool = prompt_pool(tokenizer, arm, cfg, concurrency)
    shares = split(arm.name, mesh.targets[arm.name], cfg, pool, concurrency)
    before: dict[str, float] = {}
    started: list[float] = []

    def on_start() -> None:  # after the warmup, right before the timed part
        before.update(sample(mesh.pids))
        started.append(time.perf_counter())

    load = run_arm(shares, on_start)
    after, wall = sample(mesh.pids), time.perf_counter() - started[0]
    summary = summarize(load.results, load.duration_s, max_in_flight=concurrency)
    done = [r for r in load.results if r.success]
    chunks = sum(r.chunks for r in done)
    cpu = CpuUsage.between(before, after, wall, summary.total_output_tokens)
    return ArmRun(
        arm=arm.name,
        concurrency=concurrency,
        summary=summary,
        cpu=cpu.with_process(LOADGEN, load.loadgen_cpu_s),
        tokens_per_message=summary.total_output_tokens / chunks if chunks else float("nan"),
        steady=steady_rate(load.results, concurrency),
        ideal_tok_s=cfg.ideal_tok_s(concurrency),
        loadavg=loadavg(),
        warmup_error=load.warmup_error,
    )


def run(cfg: MeshBenchConfig, report: Report) -> None:
    """Start the mesh, then every arm at every level (levels outer: the arms of one level run
    back to back, close in time)."""
    tokenizer = load_tokenizer(cfg.model)
    log_dir = Path(cfg.log_dir) if cfg.log_dir else None
    with Fleet(log_dir, cfg.startup_timeout) as fleet:
        log.info("logs in %s", fleet.log_dir)
        mesh = start_mesh(cfg, fleet)
        report.skipped.update(mesh.skipped)
        for arm, why in mesh.skipped.items():
            log.warning("arm %s skipped: %s", arm, why)
        for level in cfg.levels():
            for name in cfg.arm_list():
                if name in mesh.skipped:
                    continue
                log.info("concurrency %d: %s", level, ARMS[name].label)
                result = measure(cfg, mesh, ARMS[name], level, tokenizer)
                report.runs.append(result)
                s = result.summary
                log.info(
                    "  %d done, %d failed, %.0f tok/s, loadgen %.2f cores",
                    s.completed,
                    s.failed,
                    s.output_throughput,
                    result.cpu.cores(LOADGEN),
                )
                fleet.check_alive()
    if cfg.offline_reference:
        from benchmarks.mesh.offline import offline_decode_tok_s  # loads torch and the model

        report.offline_tok_s = offline_decode_tok_s(cfg)
        for r in report.runs:
            r.ideal_tok_s = report.offline_tok_s.get(r.concurrency)


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": _version("grpcio"),
        "smg": _version("smg"),
        "loadavg_1min_at_start": loadavg(),
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "The token path at a known worker speed: starts one worker (the model-free "
            "stepping worker, or the real services.decode with --worker real) and the real "
            "tokenizer, router and gateway (and smg, if installed) on free loopback ports, then "
            "drives each arm at each --concurrency with closed-loop clients (benchmarks "
            "serve's backends): worker direct, router gRPC with token ids, router gRPC with "
            "text, gateway OpenAI chat SSE, smg. Prints output tok/s against the ideal, ITL and "
            "TTFT p50/p99, tokens per streamed message, and each process's CPU µs per streamed "
            "token (/proc/<pid>/stat), the load generator's own included, with the load "
            "average; ratios are printed, never asserted.",
            width=88,
        ),
        epilog=textwrap.dedent(
            """\
            examples:
              python -m benchmarks mesh                              # stepping worker, 10 ms
              python -m benchmarks mesh --concurrency 4 --output-len 16 --step-ms 5 \\
                  --num-requests 8 --arms direct,router-ids,router-text,gateway
              python -m benchmarks mesh --worker real --model random:llama-3.1-8b \\
                  --device cuda --offline-reference                  # token-id arms only
            """
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_dataclass_args(parser, MeshBenchConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    cfg = parse_config(build_parser(), MeshBenchConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    setup_logging()
    report = Report(cfg, environment())
    failed = run_or_fail(lambda: run(cfg, report), (ChildDied, RuntimeError, OSError, ValueError))
    if failed is not None:
        return failed
    report.environment["loadavg_1min_at_end"] = loadavg()
    print(render(report))
    if cfg.output:
        write_json(report, cfg.output)
        print(f"wrote {cfg.output}")
    return 0 if report.runs else 1


if __name__ == "__main__":
    sys.exit(main())
