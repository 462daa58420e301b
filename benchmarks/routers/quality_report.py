"""The routing-quality table: per arm, prefix hit rate, TTFT and balance, and the issue's
targets as ratios (printed, never asserted)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from benchmarks.routers.stats import ratio

if TYPE_CHECKING:
    from benchmarks.routers.quality import Report

MAX_MIN_TARGET = 1.5


def render(report: Report) -> str:
    cfg = report.config
    lines = [
        f"routing quality: {cfg['workers']} workers ({cfg['model']}, {cfg['device']}, "
        f"{cfg['num_pages']} pages of {cfg['page_size']} tokens each); {cfg['tenants']} tenants "
        f"x {cfg['prompts_per_tenant']} requests of {cfg['system_prompt_len']}+"
        f"{cfg['question_len']} tokens, {cfg['output_len']} out, concurrency "
        f"{cfg['concurrency']}",
        "",
        f"{'arm':<28}{'hit rate':>9}{'replies':>9}{'TTFT mean':>11}{'TTFT p99':>10}"
        f"{'max/min':>9}{'per worker':>16}{'wall s':>8}{'failed':>8}",
    ]
    for arm in report.arms:
        reported = ratio(arm.reported_cached_tokens, arm.prompt_tokens)
        per_worker = "/".join(str(n) for n in arm.per_worker.values())
        lines.append(
            f"{arm.name:<28}{arm.hit_rate:>9.3f}{reported:>9.3f}{arm.ttft_mean_ms:>9.0f}ms"
            f"{arm.ttft_p99_ms:>8.0f}ms{arm.max_min_load:>9.2f}{per_worker:>16}"
            f"{arm.wall_s:>8.1f}{arm.failures:>8}"
        )
    for name, why in report.skipped.items():
        lines.append(f"{name:<28}skipped: {why}")
    lines += ["", *targets(report)]
    errors = [f"{a.name}: {a.first_error}" for a in report.arms if a.first_error]
    if errors:
        lines += ["", "errors (first per arm):", *("  " + e for e in errors)]
    env = report.environment
    lines += [
        "",
        f"hit rate: prompt tokens the workers served from their prefix caches (their GetLoad "
        f"counters) over prompt tokens sent; best possible here {report.best_hit_rate:.3f} "
        "(each tenant's first request misses; only whole pages match). replies: the same from "
        "the replies' cached_tokens. max/min: requests per worker, most over fewest.",
        f"{env.get('cpus')} CPUs, load average {env.get('loadavg_1min_at_start')} at start, "
        f"{env.get('loadavg_1min_at_end')} at end.",
    ]
    return "\n".join(lines)


def targets(report: Report) -> list[str]:
    by_name = {a.name: a for a in report.arms}
    ca = by_name.get("pdmesh cache_aware")
    if ca is None:
        return ["targets: need the pdmesh cache_aware arm"]
    out = ["targets:"]
    rr = by_name.get("pdmesh round_robin")
    sgl = next((a for a in report.arms if a.router == "sglang-router"), None)
    if sgl is not None:
        out.append(
            _line(f"cache_aware hit rate >= {sgl.name}'s", ratio(ca.hit_rate, sgl.hit_rate), 1.0)
        )
    if rr is not None:
        out.append(
            _line("cache_aware hit rate >= 2x round_robin's", ratio(ca.hit_rate, rr.hit_rate), 2.0)
        )
    verdict = "met" if ca.max_min_load <= MAX_MIN_TARGET else "MISSED"
    out.append(f"  {'cache_aware max/min load <= 1.5':<44} {ca.max_min_load:6.2f}{'':>16}{verdict}")
    return out


def _line(label: str, value: float, bound: float) -> str:
    verdict = "n/a" if value != value else ("met" if value >= bound else "MISSED")
    return f"  {label:<44} ratio {value:6.2f} (target >= {bound:g}): {verdict}"
