"""The router-overhead table: per arm medians over rounds, what each router adds, and the
issue's targets as ratios against sglang-router (printed, never asserted)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.routers import overhead_config as oc
from benchmarks.routers.stats import median, ratio

if TYPE_CHECKING:
    from benchmarks.routers.overhead import Report

LABELS = {
    oc.DIRECT_HTTP: "direct HTTP (baseline)",
    oc.DIRECT_GRPC: "direct gRPC (baseline)",
    oc.SGLANG: "(a) sglang-router, HTTP",
    oc.PDMESH_HTTP: "(b) pdmesh gateway+router, HTTP",
    oc.PDMESH_GRPC: "(c) pdmesh router, gRPC",
    oc.GRPC_FLOOR: "bare grpc.aio proxy (floor)",
}


def render(report: Report) -> str:
    cfg = report.config
    lines = [
        f"router overhead: {cfg['workers']} echo workers, {cfg['prompt_len']}-token prompts, "
        f"{cfg['num_tokens']} tokens back, policy {cfg['policy']}; medians over "
        f"{cfg['repeats']} rounds of {cfg['latency_requests']} requests at concurrency 1 and "
        f"{cfg['throughput_requests']} at concurrency {cfg['concurrency']}",
        "",
        f"{'arm':<33}{'p50 ms':>8}{'p99 ms':>8}{'+p50 ms':>9}{'+p99 ms':>9}"
        f"{'req/s':>9}{'x base':>8}{'cpu us/req':>11}{'failed':>8}",
    ]
    for name, runs in report.arms.items():
        base = report.arms.get(runs.baseline) if runs.baseline else None
        rps = median(runs.req_per_s)
        lines.append(
            f"{LABELS.get(name, name):<33}{median(runs.p50_ms):>8.3f}{median(runs.p99_ms):>8.3f}"
            f"{_f(report.added(name, 'p50_ms'), 9)}{_f(report.added(name, 'p99_ms'), 9)}"
            f"{rps:>9.0f}{_f(ratio(rps, median(base.req_per_s)) if base else float('nan'), 8, 2)}"
            f"{_f(median(runs.cpu_us_per_req), 11, 0)}{runs.failures:>8}"
        )
    for arm, why in report.skipped.items():
        lines.append(f"{LABELS.get(arm, arm):<33}skipped: {why}")
    lines += ["", *targets(report)]
    errors = [f"{n}: {r.first_error}" for n, r in report.arms.items() if r.first_error]
    if errors:
        lines += ["", "errors (first per arm):", *("  " + e for e in errors)]
    env = report.environment
    lines += [
        "",
        f"{env.get('cpus')} CPUs, load average {env.get('loadavg_1min_at_start')} at start, "
        f"{env.get('loadavg_1min_at_end')} at end (other processes move every figure: compare "
        "arms of the same run only); sglang-router "
        f"{env.get('sglang-router')}, grpcio {env.get('grpcio')}, python {env.get('python')}",
        "+p50/+p99: the arm minus its baseline in the same round (HTTP arms: direct HTTP; the "
        "gRPC arms: direct gRPC). x base: req/s over the baseline's. cpu us/req: CPU time "
        "of the arm's own processes (router; gateway + router) per request, both phases: "
        "the figure other load on the machine moves least.",
    ]
    return "\n".join(lines)


def targets(report: Report) -> list[str]:
    """The issue's targets, each as a ratio to sglang-router's figure, and the floor."""
    out = _against_sglang(report) + _floor(report)
    return out or ["targets: need the sglang-router arm (skipped or not asked for)"]


def _against_sglang(report: Report) -> list[str]:
    if oc.SGLANG not in report.arms:
        return []
    a50 = report.added(oc.SGLANG, "p50_ms")
    a99 = report.added(oc.SGLANG, "p99_ms")
    a_rps = median(report.arms[oc.SGLANG].req_per_s)
    out = ["targets (ratios to sglang-router's figure):"]
    if oc.PDMESH_GRPC in report.arms:
        c50 = report.added(oc.PDMESH_GRPC, "p50_ms")
        c99 = report.added(oc.PDMESH_GRPC, "p99_ms")
        c_rps = median(report.arms[oc.PDMESH_GRPC].req_per_s)
        out.append(_target("(c) added p50 <= (a)'s", c50, a50, 1.0, lower=True))
        out.append(_target("(c) added p99 <= (a)'s", c99, a99, 1.0, lower=True))
        out.append(_target("(c) req/s >= (a)'s", c_rps, a_rps, 1.0, lower=False))
        # the same target in the figure other load moves least: CPU time per request
        a_cpu = median(report.arms[oc.SGLANG].cpu_us_per_req)
        c_cpu = median(report.arms[oc.PDMESH_GRPC].cpu_us_per_req)
        out.append(_target("(c) CPU/req <= (a)'s", c_cpu, a_cpu, 1.0, lower=True))
    if oc.PDMESH_HTTP in report.arms:
        b50 = report.added(oc.PDMESH_HTTP, "p50_ms")
        b99 = report.added(oc.PDMESH_HTTP, "p99_ms")
        out.append(_target("(b) added p50 <= 2x (a)'s", b50, a50, 2.0, lower=True))
        out.append(_target("(b) added p99 <= 2x (a)'s", b99, a99, 2.0, lower=True))
    if oc.GRPC_FLOOR in report.arms:
        f50 = report.added(oc.GRPC_FLOOR, "p50_ms")
        f_rps = median(report.arms[oc.GRPC_FLOOR].req_per_s)
        out.append(
            f"  a bare grpc.aio hop adds {ratio(f50, a50):.2f}x sglang-router's p50 and serves "
            f"{ratio(f_rps, a_rps):.2f}x its req/s"
        )
    return out


def _floor(report: Report) -> list[str]:
    if oc.GRPC_FLOOR not in report.arms or oc.PDMESH_GRPC not in report.arms:
        return []
    f50 = report.added(oc.GRPC_FLOOR, "p50_ms")
    c50 = report.added(oc.PDMESH_GRPC, "p50_ms")
    f_rps = median(report.arms[oc.GRPC_FLOOR].req_per_s)
    c_rps = median(report.arms[oc.PDMESH_GRPC].req_per_s)
    return [
        f"pdmesh's router vs the bare grpc.aio floor: {c50 - f50:+.3f} ms p50 of its own "
        f"({ratio(c50, f50):.2f}x the floor's added p50), {ratio(c_rps, f_rps):.2f}x its req/s"
    ]


def _target(label: str, ours: float, theirs: float, bound: float, lower: bool) -> str:
    """``ours`` / ``theirs`` against ``bound``; n/a when sglang-router's figure is not above 0
    (an added latency that other load on the machine made look negative)."""
    value = ratio(ours, theirs) if theirs > 0 else float("nan")
    if value != value:
        verdict = "n/a (sglang-router's figure is not above the noise)"
    elif (value <= bound) if lower else (value >= bound):
        verdict = "met"
    else:
        verdict = "MISSED"
    return (
        f"  {label:<28} ratio {value:6.2f} (target {'<=' if lower else '>='} {bound:g}): {verdict}"
    )


def _f(value: float, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if value != value else f"{value:>{width}.{digits}f}"
