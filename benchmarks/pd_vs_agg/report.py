"""Figures of each topology's runs, their medians, the 1p1d / 2agg ratios, the table and JSON.

ITL pools every gap of every request (the load generator's definition: the streams dominate);
TTFT is split by kind, since a long prompt's includes its prefill and a stream's does not;
throughputs divide by the run's duration (first send to last completion).
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from benchmarks.pd_vs_agg.config import PdVsAggConfig
from benchmarks.pd_vs_agg.workload import MixedRun
from benchmarks.serve.metrics import Distribution, Summary, summarize

# the load generator's: inf -> "inf", nan -> null, so the file is strict JSON
from benchmarks.serve.report import _finite as finite
from benchmarks.serve.report import write_json

__all__ = ["Report", "TopologyRun", "figures", "render", "to_json", "write_json"]

# (key, label) in table order
ROWS = (
    ("ttft_long_p50_ms", "TTFT p50, long prompts (ms)"),
    ("ttft_long_p99_ms", "TTFT p99, long prompts (ms)"),
    ("ttft_stream_p50_ms", "TTFT p50, streams (ms)"),
    ("ttft_stream_p99_ms", "TTFT p99, streams (ms)"),
    ("itl_p50_ms", "ITL p50 (ms)"),
    ("itl_p99_ms", "ITL p99 (ms)"),
    ("output_tok_s", "output throughput (tok/s)"),
    ("total_tok_s", "total throughput (tok/s)"),
    ("stream_requests", "streams completed"),
    ("long_requests", "long prompts completed"),
    ("failed", "failed requests"),
)
ITL_TARGET = 0.5  # issue 7: 1p1d's ITL p99 at most half of 2agg's ...
THROUGHPUT_TARGET = 1.0  # ... at no worse (output) throughput


@dataclass
class TopologyRun:
    topology: str
    repeat: int
    figures: dict[str, float]
    summaries: dict[str, Summary]  # "all", "streams", "long"
    transfer: dict[str, Any] | None = None  # 1p1d: transfer.summarize
    loads: dict[str, dict[str, int]] = field(default_factory=dict)  # after the run, by worker


@dataclass
class Report:
    config: PdVsAggConfig
    environment: dict[str, Any]
    runs: list[TopologyRun] = field(default_factory=list)

    def medians(self, topology: str) -> dict[str, float]:
        runs = [r.figures for r in self.runs if r.topology == topology]
        return {k: _median([f[k] for f in runs]) for k in runs[0]} if runs else {}

    def transfer_medians(self) -> dict[str, float]:
        runs = [r.transfer for r in self.runs if r.transfer is not None]
        if not runs:
            return {}
        numeric = [k for k, v in runs[0].items() if isinstance(v, int | float)]
        return {k: _median([t[k] for t in runs]) for k in numeric}

    def transfer_backends(self) -> list[str]:
        """The backends the 1p1d runs' rooms went over (what ``auto`` negotiated)."""
        seen = {b for r in self.runs if r.transfer for b in r.transfer["backends"].split(",")}
        return sorted(seen - {""})

    def ratios(self) -> dict[str, float]:
        """1p1d / 2agg of every figure (both topologies must have run)."""
        pd, agg = self.medians("1p1d"), self.medians("2agg")
        if not pd or not agg:
            return {}
        return {k: _ratio(pd[k], agg[k]) for k, _ in ROWS}

    def targets(self) -> dict[str, Any]:
        r = self.ratios()
        if not r:
            return {}
        itl, tput = r["itl_p99_ms"], r["output_tok_s"]
        return {
            "itl_p99_ratio": itl,
            "itl_p99_met": bool(itl <= ITL_TARGET),
            "output_throughput_ratio": tput,
            "output_throughput_met": bool(tput >= THROUGHPUT_TARGET),
        }


def figures(run: MixedRun) -> tuple[dict[str, float], dict[str, Summary]]:
    both = run.streams + run.longs
    s = {
        "all": summarize(both, run.duration_s),
        "streams": summarize(run.streams, run.duration_s),
        "long": summarize(run.longs, run.duration_s),
    }
    a = s["all"]
    out = {
        "ttft_long_p50_ms": _pct(s["long"].ttft_ms, 50),
        "ttft_long_p99_ms": _pct(s["long"].ttft_ms, 99),
        "ttft_stream_p50_ms": _pct(s["streams"].ttft_ms, 50),
        "ttft_stream_p99_ms": _pct(s["streams"].ttft_ms, 99),
        "itl_p50_ms": _pct(a.itl_ms, 50),
        "itl_p99_ms": _pct(a.itl_ms, 99),
        "output_tok_s": a.output_throughput,
        "total_tok_s": a.total_token_throughput,
        "stream_requests": float(s["streams"].completed),
        "long_requests": float(s["long"].completed),
        "failed": float(a.failed),
        "duration_s": run.duration_s,
    }
    return out, s


def _pct(d: Distribution | None, p: int) -> float:
    if d is None:
        return float("nan")
    return d.p50 if p == 50 else d.p99


def _median(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else float("nan")


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


# -- the table ---------------------------------------------------------------------------------


def render(report: Report) -> str:
    cfg, env = report.config, report.environment
    names = [t for t in ("1p1d", "2agg") if report.medians(t)]
    n_runs = cfg.repeats
    lines = [
        f"1 prefill + 1 decode vs 2 aggregated workers: {cfg.model} on "
        f"{env.get('device_name', cfg.device)}, medians of {n_runs} run(s) per topology",
        f"workload: {cfg.stream_clients} streams ({cfg.stream_input_len} prompt + "
        f"{cfg.stream_output_len} output tokens, closed loop) + {cfg.long_requests} long "
        f"prompts ({cfg.long_input_min}-{cfg.long_input_max} + {cfg.long_output_len} tokens) "
        f"at {cfg.long_rate:g}/s (Poisson); step budget {cfg.max_num_batched_tokens} tokens",
        f"1p1d: KV by {cfg.kv_transfer_backend}, --disagg-min-prompt-tokens "
        f"{cfg.disagg_min_prompt_tokens}; 2agg: round_robin",
        "",
    ]
    medians = {t: report.medians(t) for t in names}
    ratios = report.ratios()
    header = f"{'':<30}" + "".join(f"{t:>12}" for t in names)
    if ratios:
        header += f"{'1p1d/2agg':>12}"
    lines.append(header)
    for key, label in ROWS:
        row = f"{label:<30}" + "".join(f"{_num(medians[t][key]):>12}" for t in names)
        if ratios:
            row += f"{_num(ratios[key], 3):>12}"
        lines.append(row)
    targets = report.targets()
    if targets:
        lines += [
            "",
            f"target ITL p99 ratio <= {ITL_TARGET}: {targets['itl_p99_ratio']:.3f} "
            f"({'met' if targets['itl_p99_met'] else 'missed'}); output throughput ratio >= "
            f"{THROUGHPUT_TARGET:g}: {targets['output_throughput_ratio']:.3f} "
            f"({'met' if targets['output_throughput_met'] else 'missed'})",
        ]
    t = report.transfer_medians()
    if t:
        lines += [
            "",
            f"1p1d KV transfer ({_backend_label(cfg.kv_transfer_backend, report)}): "
            f"{t['rooms']:.0f} rooms, "
            f"{_bytes(t['bytes'])} in {t['seconds'] * 1e3:.1f} ms of writes = "
            f"{t['gbps']:.2f} GB/s; long prompts' rooms (median of {t['long_rooms']:.0f}): "
            f"{_bytes(t['long_mb_p50'] * 1e6)} in {t['long_ms_p50']:.1f} ms = "
            f"{t['long_gbps_p50']:.2f} GB/s; their TTFT p50 "
            f"{_num(medians['1p1d']['ttft_long_p50_ms'])} ms",
        ]
    return "\n".join(lines)


def _backend_label(configured: str, report: Report) -> str:
    seen = report.transfer_backends()
    return f"{configured}: {', '.join(seen)}" if seen and seen != [configured] else configured


def _bytes(n: float) -> str:
    if math.isnan(n):
        return "n/a"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _num(v: float, digits: int = 1) -> str:
    if math.isnan(v):
        return "n/a"
    return f"{v:,.{digits}f}"


# -- JSON --------------------------------------------------------------------------------------


def to_json(report: Report) -> dict[str, Any]:
    names = [t for t in ("1p1d", "2agg") if report.medians(t)]
    doc = {
        "config": dataclasses.asdict(report.config),
        "environment": report.environment,
        "runs": [
            {
                "topology": r.topology,
                "repeat": r.repeat,
                "figures": r.figures,
                "transfer": r.transfer,
                "loads_after": r.loads,
                "summaries": {k: dataclasses.asdict(s) for k, s in r.summaries.items()},
            }
            for r in report.runs
        ],
        "medians": {t: report.medians(t) for t in names},
        "ratios_1p1d_over_2agg": report.ratios(),
        "targets": report.targets(),
        "transfer_medians": report.transfer_medians(),
    }
    return finite(doc)
