"""``python -m benchmarks vs-smg``: its flags, and the capacity workload's arithmetic (best
possible hit rate, requests per worker from a worker's real /metrics exposition, the table)."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client import generate_latest

from benchmarks.serve.metrics import summarize
from benchmarks.serve.timing import RequestResult
from benchmarks.smg import build_parser, main
from benchmarks.smg_capacity import (
    Arm,
    CapacityReport,
    CapacityRun,
    arms,
    best_hit_rate,
    generate_calls,
    render_capacity,
    rotated,
)
from benchmarks.smg_config import SmgBenchConfig
from pdmesh.config import from_args
from pdmesh.telemetry.metrics import Metrics


def parse(*argv: str) -> SmgBenchConfig:
    return from_args(SmgBenchConfig, build_parser().parse_args(list(argv)))


def test_every_flag_has_help_and_maps_to_a_field() -> None:
    flags = {a.dest: a for a in build_parser()._actions if a.dest != "help"}
    assert set(flags) == {f.name for f in dataclasses.fields(SmgBenchConfig)}
    assert all(a.help and len(a.help) > 20 for a in flags.values())


def test_capacity_flags_parse_into_the_config() -> None:
    cfg = parse(
        "--no-random-workload", "--no-shared-prefix", "--capacity-workers", "4",
        "--capacity-num-pages", "64", "--capacity-page-size", "8", "--capacity-tenants", "16",
        "--capacity-prompts-per-tenant", "5", "--capacity-system-prompt-len", "96",
        "--capacity-question-len", "12", "--capacity-output-len", "2",
        "--capacity-concurrency", "9", "--no-capacity-reference",
        "--smg-args", "--worker-warmup-secs 0  --worker-warmup-divert-every 0",
    )  # fmt: skip
    assert not cfg.random_workload and not cfg.shared_prefix and cfg.capacity
    assert (cfg.capacity_workers, cfg.capacity_num_pages, cfg.capacity_page_size) == (4, 64, 8)
    assert (cfg.capacity_tenants, cfg.capacity_prompts_per_tenant) == (16, 5)
    assert (cfg.capacity_system_prompt_len, cfg.capacity_question_len) == (96, 12)
    assert (cfg.capacity_output_len, cfg.capacity_concurrency) == (2, 9)
    assert not cfg.capacity_reference
    assert [a.name for a in arms(cfg)] == ["pdmesh", "smg"]
    assert cfg.smg_arg_list() == [
        "--worker-warmup-secs", "0", "--worker-warmup-divert-every", "0",
    ]  # fmt: skip
    # the capacity workers' context: what their pool holds, capped by --max-model-len
    assert cfg.capacity_max_model_len() == 64 * 8
    assert parse("--max-model-len", "256").capacity_max_model_len() == 256


def test_defaults_run_every_workload_with_a_reference_arm() -> None:
    cfg = parse()
    assert cfg.random_workload and cfg.shared_prefix and cfg.capacity
    assert [a.name for a in arms(cfg)] == ["pdmesh", "smg", "round_robin"]
    assert all(a.policy == "cache_aware" for a in arms(cfg)[:2])
    assert cfg.smg_arg_list() == []


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--capacity-workers", "0"], "--capacity-workers=0 must be > 0"),
        (["--capacity-concurrency", "-1"], "--capacity-concurrency=-1 must be > 0"),
        (["--capacity-page-size", "0"], "--capacity-page-size=0 must be > 0"),
        (["--capacity-num-pages", "8"], "cannot hold one request of 148 tokens"),
        (["--no-random-workload", "--no-shared-prefix", "--no-capacity"], "nothing to run"),
        (["--policy", "prefix_hash"], "--policy='prefix_hash'"),
    ],
)
def test_bad_flags_are_rejected(argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse(*argv)


def test_a_tiny_pool_is_fine_when_the_capacity_workload_is_off() -> None:
    assert parse("--capacity-num-pages", "8", "--no-capacity").capacity_num_pages == 8


def test_main_reports_bad_flags_with_exit_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--capacity-tenants", "0", "--no-progress"]) == 2
    assert "--capacity-tenants=0 must be > 0" in capsys.readouterr().err


def test_best_hit_rate_reuses_whole_pages_of_the_longest_earlier_prefix() -> None:
    system = list(range(100, 110))  # 10 shared tokens
    prompts = [
        system + [1, 2],  # first: misses
        system + [3, 4],  # shares 10 -> 2 pages of 4
        [7, 7, 7, 7, 7],  # shares nothing
        system + [3, 4, 5],  # shares 12 with the second -> 3 pages
        system[:4] + [9],  # shares 4, but the last token is never matched -> 1 page
    ]
    hits = 0 + 8 + 0 + 12 + 4
    total = sum(len(p) for p in prompts)
    assert best_hit_rate(prompts, page_size=4) == pytest.approx(hits / total)
    assert best_hit_rate([[1, 2, 3]], page_size=1) == 0.0


def test_generate_calls_counts_both_protocols_from_a_worker_exposition() -> None:
    metrics = Metrics()
    for method, code, n in [
        ("/pdmesh.v1.WorkerService/Generate", "OK", 3),
        ("/sglang.grpc.scheduler.SglangScheduler/Generate", "OK", 4),
        ("/sglang.grpc.scheduler.SglangScheduler/Generate", "CANCELLED", 1),
        ("/pdmesh.v1.WorkerService/GetLoad", "OK", 9),
    ]:
        for _ in range(n):
            metrics.observe(method, code, 0.01, failed=code != "OK")
    assert generate_calls(generate_latest(metrics.registry).decode()) == 8
    assert generate_calls("") == 0


def test_rotated_puts_each_arm_first_in_turn() -> None:
    items = [Arm(n, "pdmesh", "cache_aware") for n in "abc"]
    firsts = [rotated(items, r)[0].name for r in range(4)]
    assert firsts == ["a", "b", "c", "a"]
    assert sorted(a.name for a in rotated(items, 2)) == ["a", "b", "c"]


def _run(arm: str, repeat: int, hits: int, prompt_tokens: int) -> CapacityRun:
    results = [RequestResult(0, prompt_tokens, 1, success=True, prompt_tokens=prompt_tokens)]
    summary = summarize(results, 1.0)
    return CapacityRun(arm, repeat, summary, [hits, 0], [1, 0], best_hit_rate=0.8)


def test_render_capacity_prints_medians_and_ratios() -> None:
    cfg = parse("--repeats", "3")
    report = CapacityReport(
        [
            *(_run("pdmesh", r, h, 100) for r, h in enumerate([70, 60, 75])),
            *(_run("smg", r, h, 100) for r, h in enumerate([50, 60, 40])),
            *(_run("round_robin", r, 30, 100) for r in range(3)),
        ]
    )
    assert report.median_hit_rate("pdmesh") == pytest.approx(0.70)
    assert report.median_hit_rate("smg") == pytest.approx(0.50)
    text = "\n".join(render_capacity(cfg, report))
    assert "hit rate pdmesh / smg 1.400" in text
    assert "pdmesh / round_robin 2.333" in text
    assert "pdmesh / smg per run (same requests): 1.400 1.000 1.875" in text
    assert "0.700 0.600 0.750" in text and "1/0  1/0  1/0" in text
