"""The mesh benchmark's figures: one ``ArmRun`` per arm and concurrency, printed as a markdown
table (figures and ratios of one run, never asserted) and written as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.mesh.arms import ARMS
from benchmarks.mesh.config import MeshBenchConfig
from benchmarks.mesh.cpu import LOADGEN, CpuUsage
from benchmarks.mesh.procs import GATEWAY_PROC, PATHS, ROUTER, SMG_PROC, TOKENIZER, WORKER
from benchmarks.mesh.steady import Steady
from benchmarks.serve.metrics import Summary

# the CPU columns, in path order
PROCESSES = (WORKER, ROUTER, TOKENIZER, GATEWAY_PROC, SMG_PROC)


@dataclass
class ArmRun:
    """One arm at one concurrency."""

    arm: str
    concurrency: int
    summary: Summary
    cpu: CpuUsage
    tokens_per_message: float  # output tokens over the streamed messages that carried them
    steady: Steady  # the rate while every client was busy
    ideal_tok_s: float | None
    loadavg: float | None  # at the arm's end
    warmup_error: str = ""

    @property
    def path(self) -> tuple[str, ...]:
        return PATHS[self.arm]

    @property
    def of_ideal(self) -> float:
        """The whole arm's output rate over the ideal."""
        rate = self.summary.output_throughput
        return rate / self.ideal_tok_s if self.ideal_tok_s else math.nan

    def figures(self) -> dict[str, Any]:
        s = self.summary
        return {
            "arm": self.arm,
            "concurrency": self.concurrency,
            "completed": s.completed,
            "failed": s.failed,
            "output_len_mismatch": s.output_len_mismatch,
            "output_tok_s": s.output_throughput,
            "steady_tok_s": _none(self.steady.tok_s),
            "steady_window_s": self.steady.window_s,
            "ideal_tok_s": self.ideal_tok_s,
            "of_ideal": None if math.isnan(self.of_ideal) else self.of_ideal,
            "itl_p50_ms": _p(s.itl_ms, "p50"),
            "itl_p99_ms": _p(s.itl_ms, "p99"),
            "ttft_p50_ms": _p(s.ttft_ms, "p50"),
            "ttft_p99_ms": _p(s.ttft_ms, "p99"),
            "tokens_per_message": self.tokens_per_message,
            "path": list(self.path),
            "cpu_seconds": self.cpu.seconds,
            "cpu_us_per_token": {n: _none(self.cpu.us_per_token(n)) for n in self.cpu.seconds},
            "cpu_cores": {n: _none(self.cpu.cores(n)) for n in self.cpu.seconds},
            "wall_s": self.cpu.wall_s,
            "tokens": self.cpu.tokens,
            "loadavg_1min": self.loadavg,
            "warmup_error": self.warmup_error,
            "errors": [dataclasses.asdict(e) for e in s.errors],
            "summary": dataclasses.asdict(s),
        }


@dataclass
class Report:
    config: MeshBenchConfig
    environment: dict[str, Any] = field(default_factory=dict)
    runs: list[ArmRun] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # arm -> why
    offline_tok_s: dict[int, float] = field(default_factory=dict)  # real worker, by batch


def render(report: Report) -> str:
    cfg, env = report.config, report.environment
    worker = (
        f"model-free stepping worker ({cfg.step_ms:g} ms steps, {cfg.model}'s vocabulary)"
        if cfg.worker == "stepping"
        else f"real worker ({cfg.model} on {cfg.device})"
    )
    lines = [
        f"token path: {worker}; {cfg.prompt_len}-token prompts, {cfg.output_len} output tokens, "
        f"greedy, EOS ignored; {_amount(cfg)} per arm and concurrency; "
        f"{cfg.client_processes} load generator process(es)",
        "",
        "| conc | arm | done/failed | out tok/s | steady tok/s | ideal tok/s | x ideal | "
        "ITL p50 ms | ITL p99 ms | TTFT p50 ms | TTFT p99 ms | tok/msg | "
        + " | ".join(f"{p} µs/tok" for p in PROCESSES)
        + " | path µs/tok | loadgen µs/tok | loadgen cores | load |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        + " | ".join("---:" for _ in PROCESSES)
        + " | ---: | ---: | ---: | ---: |",
    ]
    lines += [_row(r) for r in report.runs]
    for arm, why in report.skipped.items():
        lines.append(f"| | {ARMS[arm].label} | skipped: {why} |")
    errors = [
        f"- {ARMS[r.arm].label} at {r.concurrency}: {e.count}x {e.message}"
        for r in report.runs
        for e in r.summary.errors[:1]
    ]
    errors += [
        f"- {ARMS[r.arm].label} at {r.concurrency}: every warmup request failed: {r.warmup_error}"
        for r in report.runs
        if r.warmup_error
    ]
    if errors:
        lines += ["", "errors (first per arm):", *errors]
    lines += [
        "",
        f"{env.get('cpus')} CPUs, load average {env.get('loadavg_1min_at_start')} at start, "
        f"{env.get('loadavg_1min_at_end')} at end (the 'load' column: at each arm's end); "
        f"python {env.get('python')}, grpcio {env.get('grpcio')}, smg {env.get('smg')}",
        *_legend(cfg),
    ]
    return "\n".join(lines)


def _row(r: ArmRun) -> str:
    s, cpu = r.summary, r.cpu
    done = f"{s.completed}/{s.failed}" + (
        f" ({s.output_len_mismatch} short)" if s.output_len_mismatch else ""
    )
    cells = [
        str(r.concurrency),
        ARMS[r.arm].label,
        done,
        _f(s.output_throughput, 0),
        _steady(r.steady),
        _f(r.ideal_tok_s, 0),
        _f(r.of_ideal, 3),
        _f(_p(s.itl_ms, "p50"), 2),
        _f(_p(s.itl_ms, "p99"), 2),
        _f(_p(s.ttft_ms, "p50"), 1),
        _f(_p(s.ttft_ms, "p99"), 1),
        _f(r.tokens_per_message, 2),
        *(_f(cpu.us_per_token(p), 0) if p in r.path else "–" for p in PROCESSES),
        _f(cpu.total_us_per_token(list(r.path)), 0),
        _f(cpu.us_per_token(LOADGEN), 0),
        _f(cpu.cores(LOADGEN), 2),
        _f(r.loadavg, 2),
    ]
    return "| " + " | ".join(cells) + " |"


def _legend(cfg: MeshBenchConfig) -> list[str]:
    ideal = (
        f"ideal tok/s: concurrency / step_ms ({cfg.step_ms:g} ms), what the worker produces"
        if cfg.worker == "stepping"
        else "ideal tok/s: the engine's offline decode tok/s at batch = concurrency "
        "(--offline-reference; blank without it)"
    )
    return [
        f"{ideal}. out tok/s: output tokens of completed requests over the arm's wall time "
        "(first send to last token: the first burst of prompts and the drain included); x ideal: "
        "out tok/s over the ideal. steady tok/s (its window in s): tokens that arrived while "
        "every client was busy (from the first wave's last first token to the last send), over "
        "that window; a short window (a slow first wave) gives a rough figure.",
        "ITL: gaps between streamed messages, a gRPC message of n tokens counted as n gaps of "
        "gap/n (benchmarks.serve's definition); an SSE chunk counts as one gap whatever it "
        "carries, and chunks read together from one socket read get gaps of ~0. tok/msg: "
        "output tokens per streamed message (gRPC) or SSE chunk: above 1 when a hop coalesced "
        "tokens for a slow reader.",
        "µs/tok: CPU time (utime + stime from /proc/<pid>/stat, all threads) of each process "
        "on the arm's path over the arm, per output token delivered ('–': not on this arm's "
        "path); path: their sum. /proc counts in clock ticks (10 ms on Linux): short arms "
        "give coarse figures. loadgen: the load generator's own CPU (all its processes); "
        "its cores near 1.0 per process means the client, not the mesh, limited the arm "
        "(use --client-processes).",
        "arms run one after the other at each concurrency, on the same processes; compare arms "
        "of one run only (the machine is shared: see the load column).",
    ]


def to_json(report: Report) -> dict[str, Any]:
    return {
        "config": dataclasses.asdict(report.config),
        "environment": report.environment,
        "runs": [r.figures() for r in report.runs],
        "skipped": report.skipped,
        "offline_decode_tok_s": {str(k): v for k, v in report.offline_tok_s.items()},
    }


def write_json(report: Report, path: str) -> None:
    # strict JSON: nan (a figure with nothing to measure) becomes null
    Path(path).write_text(json.dumps(_clean(to_json(report)), indent=2, allow_nan=False) + "\n")


def _amount(cfg: MeshBenchConfig) -> str:
    if cfg.num_requests:
        return f"{cfg.num_requests} requests"
    return f"new requests for {cfg.arm_seconds:g} s"


def _steady(steady: Steady) -> str:
    if math.isnan(steady.tok_s):
        return ""
    return f"{steady.tok_s:,.0f} ({steady.window_s:.1f} s)"


def _p(dist: Any, name: str) -> float:
    return float(getattr(dist, name)) if dist is not None else math.nan


def _f(value: float | None, digits: int) -> str:
    if value is None or math.isnan(value):
        return ""
    return f"{value:,.{digits}f}"


def _none(value: float) -> float | None:
    return None if math.isnan(value) else value


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
