"""The printed table and the ``--output-json`` file."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pdmesh
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.metrics import SLO, Distribution, Summary
from benchmarks.serve.timing import RequestResult

WIDTH = 64
LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2E", "e2e_ms"))
DEFINITIONS = (
    "TTFT: send -> first chunk with output; E2E: send -> end of stream",
    "ITL: gaps between chunks with output (n token ids in a chunk: n gaps of gap/n)",
    "TPOT: (E2E - TTFT) / (output tokens - 1), for outputs of 2+ tokens",
    "latencies cover successful requests; throughputs divide by the duration",
    "goodput: requests meeting every given SLO, per second",
)


@dataclass(frozen=True)
class RunInfo:
    """What was run, beside the config: for the table's header and the JSON."""

    run_id: str
    target: str
    model: str
    num_requests: int


def render_table(cfg: ServeBenchConfig, info: RunInfo, s: Summary, slo: SLO) -> str:
    rows: list[tuple[str, str]] = [
        ("Backend", f"{cfg.backend} -> {info.target}"),
        ("Model", info.model or "-"),
        ("Dataset", f"{cfg.dataset} ({info.num_requests} requests, {cfg.input_format})"),
        ("Request rate (req/s)", rate_text(cfg.request_rate)),
        ("Max concurrency", str(cfg.max_concurrency) if cfg.max_concurrency else "no limit"),
        ("Successful requests", str(s.completed)),
        ("Failed requests", str(s.failed)),
        ("Duration (s)", f"{s.duration_s:.2f}"),
        ("Total input tokens", str(s.total_input_tokens)),
        ("Total output tokens", str(s.total_output_tokens)),
        ("Token counts from server usage", f"{s.usage_reported}/{s.completed}"),
        ("Outputs of another length than asked", str(s.output_len_mismatch)),
        ("Request throughput (req/s)", f"{s.request_throughput:.2f}"),
        ("Input token throughput (tok/s)", f"{s.input_throughput:.2f}"),
        ("Output token throughput (tok/s)", f"{s.output_throughput:.2f}"),
        ("Total token throughput (tok/s)", f"{s.total_token_throughput:.2f}"),
        ("Mean / max requests in flight", f"{s.concurrency:.2f} / {s.max_in_flight}"),
    ]
    if s.goodput is not None:
        rows.append(
            (
                f"Goodput (req/s) [{slo_text(slo)}]",
                f"{s.goodput:.2f} ({s.good_requests}/{s.completed + s.failed} good)",
            )
        )
    lines = [" Serving benchmark result ".center(WIDTH, "=")]
    label_w = max(len(k) for k, _ in rows) + 2
    lines += [f"{k + ':':<{label_w}}{v}" for k, v in rows]
    lines.append(" Latency (ms) ".center(WIDTH, "-"))
    lines.append(f"{'':<6}{'mean':>11}{'p50':>11}{'p90':>11}{'p99':>11}{'max':>11}")
    for name, attr in LATENCIES:
        d: Distribution | None = getattr(s, attr)
        if d is None:
            lines.append(f"{name:<6}{'-':>11}{'-':>11}{'-':>11}{'-':>11}{'-':>11}")
        else:
            vals = (d.mean, d.p50, d.p90, d.p99, d.max)
            lines.append(f"{name:<6}" + "".join(f"{v:>11.2f}" for v in vals))
    if s.errors:
        lines.append(" First errors ".center(WIDTH, "-"))
        lines += [f"[{e.count}x] {e.message}" for e in s.errors]
    lines.append("=" * WIDTH)
    lines += DEFINITIONS
    return "\n".join(lines)


def rate_text(rate: float) -> str:
    return "inf (all at once)" if math.isinf(rate) else f"{rate:g} (Poisson)"


def slo_text(slo: SLO) -> str:
    parts = [
        f"{name}<={v:g}ms"
        for name, v in (("ttft", slo.ttft_ms), ("tpot", slo.tpot_ms), ("e2e", slo.e2e_ms))
        if v is not None
    ]
    return ", ".join(parts)


def to_json(
    cfg: ServeBenchConfig,
    info: RunInfo,
    s: Summary,
    results: list[RequestResult] | None,
) -> dict[str, Any]:
    """The JSON document: what ran, the summary, and per-request results when given."""
    config = dataclasses.asdict(cfg)
    config.pop("api_key", None)  # never write a credential into a results file
    doc: dict[str, Any] = {
        "pdmesh_version": pdmesh.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run_id": info.run_id,
        "target": info.target,
        "model": info.model,
        "config": config,
        "summary": dataclasses.asdict(s),
        "definitions": list(DEFINITIONS),
    }
    if results is not None:
        doc["requests"] = [dataclasses.asdict(r) for r in results]
    return _finite(doc)


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: the file must be strict JSON for any reader; _finite made sure of it
    p.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    """JSON has no inf/nan: inf becomes the string "inf" (as in --request-rate), nan null."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
