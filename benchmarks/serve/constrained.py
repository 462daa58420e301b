"""The json_schema workload: a fraction of the requests carry ``sampling_params.json_schema``,
and the report compares them with the free ones of the same run (output tok/s and ITL).

Which requests are constrained is fixed by their index (every ``1 / fraction``-th, spread
evenly), so two runs of one config constrain the same requests and both kinds arrive
interleaved under the same load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from benchmarks.serve.metrics import Distribution, summarize
from benchmarks.serve.timing import RequestResult

# long enough to run for dozens of tokens, simple enough for a 135M model to fill
DEFAULT_SCHEMA = (
    '{"type": "object", "properties": {'
    '"title": {"type": "string", "maxLength": 40}, '
    '"tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, '
    '"minItems": 6, "maxItems": 6}, '
    '"score": {"type": "integer"}}, '
    '"required": ["title", "tags", "score"], "additionalProperties": false}'
)


def is_constrained(index: int, fraction: float) -> bool:
    """Whether request ``index`` carries the schema: floor((i + 1) f) > floor(i f)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def split_report(results: Sequence[RequestResult], duration_s: float, fraction: float) -> str:
    """Constrained vs free: completed requests, output tok/s (each kind's tokens over the whole
    run), mean per-request decode rate, ITL p50/p99, and the ratios."""
    kinds = {
        "constrained": [r for r in results if is_constrained(r.index, fraction)],
        "free": [r for r in results if not is_constrained(r.index, fraction)],
    }
    lines = ["---------------- json_schema workload ----------------"]
    lines.append(
        f"{'':<12}{'done':>6}{'out tok':>9}{'tok/s':>9}{'req tok/s':>11}{'ITL p50':>9}{'ITL p99':>9}"
    )
    rates: dict[str, tuple[float, float]] = {}
    for name, rs in kinds.items():
        s = summarize(rs, duration_s)
        per_req = [
            (r.output_tokens - 1) / (r.e2e_s - r.ttft_s)
            for r in rs
            if r.success and r.output_tokens > 1 and r.e2e_s > r.ttft_s
        ]
        mean_rate = sum(per_req) / len(per_req) if per_req else math.nan
        itl = s.itl_ms or Distribution(0, *([math.nan] * 7))
        rates[name] = (mean_rate, itl.p50)
        lines.append(
            f"{name:<12}{s.completed:>6}{s.total_output_tokens:>9}{s.output_throughput:>9.1f}"
            f"{mean_rate:>11.1f}{itl.p50:>9.1f}{itl.p99:>9.1f}"
        )
    (c_rate, c_itl), (f_rate, f_itl) = rates["constrained"], rates["free"]
    lines.append(
        f"constrained / free: per-request tok/s {c_rate / f_rate:.3f}, ITL p50 {c_itl / f_itl:.3f}"
    )
    return "\n".join(lines)
