"""Results of a benchmark run: medians, ratios, the printed table and the JSON file."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.config import BenchConfig
from benchmarks.workload import DEFINITIONS, Timing, agreement, median


@dataclass(frozen=True)
class Metric:
    label: str
    value: Callable[[Timing], float]
    higher_is_better: bool
    # tok/s is batch / step time: its median is taken from the median step time, so the two
    # printed numbers agree even for an even --repeats
    from_step_ms: bool = False


METRICS: dict[str, list[Metric]] = {
    "prefill": [Metric("prefill tok/s", lambda t: t.prefill_tok_s, True)],
    "decode": [
        Metric("decode tok/s", lambda t: t.decode_tok_s, True, from_step_ms=True),
        Metric("decode ms/step", lambda t: t.decode_ms_step, False),
    ],
}


@dataclass
class Comparison:
    """One measurement (kind, batch) timed on two sides; ratios are side ``a`` over side ``b``."""

    kind: str  # "prefill" | "decode"
    batch: int
    dtype: str  # the dtype both sides ran, or "-" when the sides are dtypes
    a: str
    b: str | None  # None when only one side ran (--skip-reference)
    runs: dict[str, list[Timing]] = field(default_factory=dict)

    def median(self, side: str | None, metric: Metric) -> float:
        if side is None:
            return float("nan")
        if metric.from_step_ms:
            return self.batch * 1000 / median([t.decode_ms_step for t in self.runs[side]])
        return median([metric.value(t) for t in self.runs[side]])

    def best(self, side: str | None, metric: Metric) -> float:
        """The fastest run: other processes only ever add time, so on a shared machine this is
        the figure least moved by them (the median is the one the table leads with)."""
        if side is None:
            return float("nan")
        if metric.from_step_ms:
            return self.batch * 1000 / min(t.decode_ms_step for t in self.runs[side])
        values = [metric.value(t) for t in self.runs[side]]
        return max(values) if metric.higher_is_better else min(values)

    def speedup(self, metric: Metric, stat: str = "median") -> float:
        """> 1 when side ``a`` is faster, whichever way the metric points."""
        get = self.median if stat == "median" else self.best
        a, b = get(self.a, metric), get(self.b, metric)
        return a / b if metric.higher_is_better else b / a

    def agreement(self) -> float:
        """Greedy tokens of the first timed runs: mean share of each row before a difference."""
        if self.b is None or not self.runs[self.a] or not self.runs[self.b]:
            return float("nan")
        return agreement(self.runs[self.a][0].tokens, self.runs[self.b][0].tokens)


@dataclass
class Report:
    config: BenchConfig
    environment: dict[str, Any]
    comparisons: list[Comparison]
    profiles: dict[str, str] = field(default_factory=dict)  # side -> --profile-steps report

    def headline(self) -> str:
        env, cfg = self.environment, self.config
        return (
            f"{env['model']} on {env['device_name']} ({env['threads']} threads), "
            f"prompt {cfg.prompt_len}, N={cfg.decode_tokens} new tokens, "
            f"median of {cfg.repeats} (after {cfg.warmup} warmup), "
            f"1-min load average at the end {env.get('loadavg_1min_at_end')}"
        )


def _fmt(x: float) -> str:
    if x != x:  # NaN
        return "-"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.2f}"


def _ratio(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def render_table(report: Report) -> str:
    comps = report.comparisons
    if not comps:
        return "(nothing measured)"
    a_name, b_name = comps[0].a, comps[0].b or "-"
    head = [
        "measurement",
        "batch",
        "dtype",
        a_name,
        b_name,
        f"speedup ({a_name} / {b_name})",
        "best-run speedup",
    ]
    rows = [head]
    for c in comps:
        for m in METRICS[c.kind]:
            rows.append(
                [
                    m.label,
                    str(c.batch),
                    c.dtype,
                    _fmt(c.median(c.a, m)),
                    _fmt(c.median(c.b, m)),
                    _ratio(c.speedup(m)),
                    _ratio(c.speedup(m, "best")),
                ]
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [report.headline(), ""]
    for i, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [
            v.rjust(w) for v, w in zip(r[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += ["", *_notes(report), *("  " + d for d in DEFINITIONS)]
    for side, text in report.profiles.items():
        lines += ["", f"== profile: {side} ==", text]
    return "\n".join(lines)


def _notes(report: Report) -> list[str]:
    notes = []
    agree = [
        f"batch {c.batch}: {c.agreement():.2f}"
        for c in report.comparisons
        if c.kind == "decode" and c.b is not None
    ]
    if agree:
        notes.append(
            "greedy tokens agree (share of each row before the sides first differ; 1.00 = "
            "identical): " + ", ".join(agree)
        )
    if report.config.compare_dtypes:
        notes += _dtype_verdicts(report.comparisons)
    notes.append("definitions:")
    return notes


def _dtype_verdicts(comps: list[Comparison]) -> list[str]:
    out = []
    for c in comps:
        m = METRICS[c.kind][0]
        ratio = c.speedup(m)
        faster = c.a if ratio > 1 else c.b
        out.append(f"{c.kind} batch {c.batch}: {faster} is faster ({max(ratio, 1 / ratio):.2f}x)")
    return out


def to_json(report: Report) -> dict[str, Any]:
    def side(c: Comparison, name: str) -> dict[str, Any]:
        return {
            m.label: {
                "median": c.median(name, m),
                "best": c.best(name, m),
                "runs": [m.value(t) for t in c.runs[name]],
            }
            for m in METRICS[c.kind]
        } | {"runs_s": [{"first_s": t.first_s, "total_s": t.total_s} for t in c.runs[name]]}

    return {
        "config": dataclasses.asdict(report.config),
        "environment": report.environment,
        "definitions": list(DEFINITIONS),
        "profiles": report.profiles,
        "comparisons": [
            {
                "kind": c.kind,
                "batch": c.batch,
                "dtype": c.dtype,
                "a": c.a,
                "b": c.b,
                "sides": {name: side(c, name) for name in c.runs},
                "speedup": {m.label: c.speedup(m) for m in METRICS[c.kind]},
                "speedup_best_run": {m.label: c.speedup(m, "best") for m in METRICS[c.kind]},
                "token_agreement": c.agreement() if c.kind == "decode" else None,
            }
            for c in report.comparisons
        ],
    }


def _nan_to_none(x: Any) -> Any:
    # NaN is not JSON: a missing side is written as null
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_nan_to_none(v) for v in x]
    return x


def write_json(report: Report, path: str) -> None:
    text = json.dumps(_nan_to_none(to_json(report)), indent=2, default=str, allow_nan=False)
    Path(path).write_text(text + "\n")
