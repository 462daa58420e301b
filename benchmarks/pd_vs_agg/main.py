"""``python -m benchmarks pd-vs-agg``: the command line, and one topology's runs end to end."""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.cli import BAD_FLAGS, parse_config, run_or_fail
from benchmarks.logs import setup_logging
from benchmarks.pd_vs_agg import topology, transfer
from benchmarks.pd_vs_agg.config import PdVsAggConfig
from benchmarks.pd_vs_agg.report import Report, TopologyRun, figures, render, to_json, write_json
from benchmarks.pd_vs_agg.topology import Topology
from benchmarks.pd_vs_agg.workload import MixedRun, Prompts, run_mixed, serve_config, warm
from benchmarks.routers.fleet import ChildDied, Fleet
from benchmarks.serve.backends import BackendError, make_backend
from pdmesh.config import add_dataclass_args
from pdmesh.models.source import resolve

log = logging.getLogger("benchmarks.pd_vs_agg")

PROG = "python -m benchmarks pd-vs-agg"
IDLE_TIMEOUT_S = 30.0  # after a run: every worker's requests and rooms must be gone by then
IDLE_POLL_S = 0.2
LOAD_FIELDS = (
    "num_running", "num_waiting", "num_free_pages", "num_total_pages", "num_preemptions",
    "num_awaiting_kv", "num_held", "num_rooms", "total_rooms",
)  # fmt: skip


def run_topology(cfg: PdVsAggConfig, fleet: Fleet, name: str, vocab: int, report: Report) -> None:
    log.info("%s: starting its processes (logs in %s)", name, fleet.log_dir)
    topo = topology.start(cfg, fleet, name)
    run_id = secrets.token_hex(3)
    asyncio.run(_warm(cfg, topo, vocab, run_id))
    for repeat in range(cfg.repeats):
        log.info(
            "%s run %d/%d: %d streams + %d long prompts at %g/s",
            name, repeat + 1, cfg.repeats, cfg.stream_clients, cfg.long_requests, cfg.long_rate,
        )  # fmt: skip
        offset = transfer.log_offset(topo.prefill.log_path) if topo.prefill else 0
        run = asyncio.run(_timed(cfg, topo, Prompts(cfg, vocab, repeat), f"{run_id}-{repeat}"))
        fleet.check_alive()
        loads = wait_idle(topo)
        figs, summaries = figures(run)
        moved = None
        if topo.prefill is not None:
            long_pages = math.ceil(cfg.long_input_min / cfg.page_size)
            moved = transfer.summarize(transfer.writes(topo.prefill.log_path, offset), long_pages)
        report.runs.append(TopologyRun(name, repeat, figs, summaries, moved, loads))
    fleet.stop_children(topo.children)


async def _warm(cfg: PdVsAggConfig, topo: Topology, vocab: int, run_id: str) -> None:
    async with make_backend(serve_config(cfg, topo.router)) as backend:
        await warm(backend, cfg, vocab, run_id)


async def _timed(cfg: PdVsAggConfig, topo: Topology, prompts: Prompts, run_id: str) -> MixedRun:
    async with make_backend(serve_config(cfg, topo.router)) as backend:
        return await run_mixed(backend, prompts, run_id)


def wait_idle(topo: Topology) -> dict[str, dict[str, int]]:
    """Every worker's load once none holds a request or a room (or at the deadline: the
    report then shows what was left)."""
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        loads = {
            name: {f: int(getattr(load, f)) for f in LOAD_FIELDS}
            for name, load in topo.loads().items()
        }
        busy = [
            name
            for name, ld in loads.items()
            if ld["num_running"] or ld["num_waiting"] or ld["num_rooms"] or ld["num_held"]
        ]
        if not busy:
            return loads
        if time.monotonic() > deadline:
            log.warning("still busy %.0fs after the run: %s", IDLE_TIMEOUT_S, ", ".join(busy))
            return loads
        time.sleep(IDLE_POLL_S)


def environment(cfg: PdVsAggConfig) -> dict[str, Any]:
    env: dict[str, Any] = {"cpus": os.cpu_count()}
    if cfg.device == "cuda":
        gpus = _gpu_names()
        env["gpus"] = gpus
        used = gpus[:2]
        env["device_name"] = (
            f"{len(used)}x {used[0]}" if used and len(set(used)) == 1 else ", ".join(used) or "cuda"
        )
    else:
        env["device_name"] = f"CPU ({os.cpu_count()} cores)"
    return env


def _gpu_names() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=textwrap.fill(
            "Serving comparison on two GPUs of one host: 1 prefill + 1 decode worker (PD "
            "disaggregation, KV moved GPU to GPU) against 2 aggregated workers, the same "
            "model and engine flags, each behind pdmesh's router as real processes. The same "
            "workload runs against each: steady streams (short prompts, long outputs, closed "
            "loop) while long prompts arrive at a Poisson rate. Prints TTFT (long prompts and "
            "streams apart), ITL p50/p99 and throughput per topology with 1p1d/2agg ratios, "
            "and the 1p1d run's KV transfer GB/s. With --device cpu it runs anywhere at tiny "
            "scale (e.g. --model random:tiny).",
            width=88,
        ),
    )
    add_dataclass_args(parser, PdVsAggConfig)
    return parser


def main(argv: list[str] | None = None, out: Callable[[str], Any] = print) -> int:
    cfg = parse_config(build_parser(), PdVsAggConfig, argv)
    if cfg is None:
        return BAD_FLAGS
    try:
        vocab = resolve(cfg.model).config.vocab_size
    except ValueError as e:  # an unknown --model
        print(f"error: {e}", file=sys.stderr)
        return BAD_FLAGS
    setup_logging()
    report = Report(cfg, environment(cfg))
    log_dir = Path(cfg.log_dir) if cfg.log_dir else None

    def run_all() -> None:
        with Fleet(log_dir, cfg.startup_timeout) as fleet:
            for name in cfg.topology_list():
                run_topology(cfg, fleet, name, vocab, report)

    failed = run_or_fail(run_all, (ChildDied, BackendError, RuntimeError))
    if failed is not None:
        return failed
    report.environment["loadavg_1min_at_end"] = os.getloadavg()[0]
    out(render(report))
    if cfg.json_out:
        write_json(cfg.json_out, to_json(report))
        log.info("wrote %s", cfg.json_out)
    return 0
