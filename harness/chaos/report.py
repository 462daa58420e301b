"""What a chaos or soak run prints: one markdown table row per fault, and per-process series
with a flat/growing verdict."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.chaos.outcomes import Tally
from harness.chaos.procstats import Trend

MIB = 2**20


@dataclass
class FaultResult:
    role: str
    fault: str  # "kill -9", "SIGTERM", "SIGSTOP"
    in_flight: Tally  # the requests in flight when the fault hit
    while_down: Tally  # the requests sent after the fault, until the role was back in use
    exit_code: int | None = None  # SIGTERM: how the process exited
    drained_s: float | None = None  # SIGTERM: from the signal to the exit
    restart_to_serving_s: float = 0.0  # restart (or SIGCONT) until the process answers
    serving_to_in_use_s: float = 0.0  # ... until the mesh routes to it again
    leaked_pages: dict[str, int] = field(default_factory=dict)  # worker -> pages not freed

    @property
    def recovery_s(self) -> float:
        return self.restart_to_serving_s + self.serving_to_in_use_s


CHAOS_HEADER = (
    "| role | fault | in flight | completed | failed (reason) | past deadline | exit | "
    "restart → serving | serving → in use | sent while down: ok / failed | leaked pages |"
)


def chaos_table(results: Sequence[FaultResult]) -> str:
    rows = [CHAOS_HEADER, "|" + " --- |" * CHAOS_HEADER.count(" | ") + " --- |"]
    for r in results:
        t = r.in_flight
        failed = str(t.failed) + (f" ({t.describe_reasons(2)})" if t.failed else "")
        exit_cell = "—" if r.exit_code is None else f"{r.exit_code} after {r.drained_s:.1f} s"
        down = r.while_down
        down_cell = f"{down.completed} / {down.failed}"
        if down.failed:
            down_cell += f" ({down.describe_reasons(1)})"
        leaked = ", ".join(f"{w}: {n}" for w, n in r.leaked_pages.items() if n) or "0"
        rows.append(
            f"| {r.role} | {r.fault} | {t.total} | {t.completed} | {_cell(failed)} | "
            f"{t.past_deadline} | {exit_cell} | {r.restart_to_serving_s:.1f} s | "
            f"{r.serving_to_in_use_s:.1f} s | {_cell(down_cell)} | {leaked} |"
        )
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")


@dataclass(frozen=True)
class SeriesReport:
    process: str
    metric: str  # "rss MiB (idle)", "fds (load)", "kv held (idle)", ...
    values: Sequence[float]
    trend: Trend
    judged: bool = True  # False: printed for the record, not part of the verdict

    @property
    def growing(self) -> bool:
        return self.judged and not self.trend.flat


def series_table(reports: Sequence[SeriesReport], width: int = 12) -> str:
    """One line per (process, metric): a few evenly spaced samples, first/last thirds, verdict."""
    lines = []
    for r in reports:
        shown = _spread(r.values, width)
        fmt = "{:.1f}" if r.metric.startswith("rss") else "{:.0f}"
        series = " ".join(fmt.format(v) for v in shown)
        verdict = ("flat" if r.trend.flat else "GROWING") if r.judged else "(not judged)"
        lines.append(
            f"{r.process:<12} {r.metric:<18} {series}  | first third {fmt.format(r.trend.first)}"
            f" -> last third {fmt.format(r.trend.last)}: {verdict}"
        )
    return "\n".join(lines)


def _spread(values: Sequence[float], n: int) -> list[float]:
    if len(values) <= n:
        return list(values)
    step = (len(values) - 1) / (n - 1)
    return [values[round(i * step)] for i in range(n)]
