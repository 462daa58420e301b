"""The mesh benchmark's CPU-per-token accounting (``benchmarks.mesh.cpu``), and the report's
CPU columns built from it."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks.mesh.config import GATEWAY, ROUTER_IDS, MeshBenchConfig
from benchmarks.mesh.cpu import LOADGEN, CpuUsage, sample
from benchmarks.mesh.report import PROCESSES, ArmRun, Report, render, to_json
from benchmarks.mesh.steady import NONE
from benchmarks.serve.metrics import summarize
from benchmarks.serve.timing import RequestResult


def test_usage_between_two_samples_per_token_and_in_cores() -> None:
    before = {"worker": 1.0, "router": 10.0, "gone": 3.0}
    after = {"worker": 1.5, "router": 12.0}
    usage = CpuUsage.between(before, after, wall_s=4.0, tokens=1000)
    assert usage.seconds == {"worker": 0.5, "router": 2.0}  # "gone" was not sampled twice
    assert usage.us_per_token("worker") == pytest.approx(500.0)
    assert usage.us_per_token("router") == pytest.approx(2000.0)
    assert usage.cores("router") == pytest.approx(0.5)
    assert usage.total_us_per_token(["worker", "router", "gateway"]) == pytest.approx(2500.0)
    assert math.isnan(usage.us_per_token("gateway"))  # not measured: nan, not 0


def test_the_load_generator_is_added_beside_the_sampled_processes() -> None:
    usage = CpuUsage({"worker": 1.0}, 2.0, 100).with_process(LOADGEN, 0.5)
    assert usage.us_per_token(LOADGEN) == pytest.approx(5000.0)
    assert usage.cores(LOADGEN) == pytest.approx(0.25)


def test_no_tokens_means_no_per_token_figure() -> None:
    usage = CpuUsage({"worker": 1.0}, 0.0, 0)
    assert math.isnan(usage.us_per_token("worker")) and math.isnan(usage.cores("worker"))
    assert math.isnan(usage.total_us_per_token(["worker"]))


def test_sample_reads_proc_of_live_and_gone_processes() -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass",
        ]
    )
    child.wait()
    gone = child.pid  # reaped: its /proc entry is gone
    first = sample({"me": os.getpid()})["me"]
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn 0.2 s of this process's CPU
        pass
    later = sample({"me": os.getpid(), "gone": gone})
    assert later["me"] - first == pytest.approx(0.2, abs=0.05)
    assert math.isnan(later["gone"])


def run(arm: str, tokens_each: int, seconds: dict[str, float]) -> ArmRun:
    results = []
    for i in range(4):
        r = RequestResult(i, 8, tokens_each, success=True, e2e_s=1.0, ttft_s=0.1)
        r.output_tokens, r.chunks, r.itl_s = tokens_each, tokens_each, [0.01] * (tokens_each - 1)
        results.append(r)
    summary = summarize(results, 2.0, max_in_flight=4)
    return ArmRun(
        arm=arm,
        concurrency=4,
        summary=summary,
        cpu=CpuUsage(seconds, 2.0, summary.total_output_tokens),
        tokens_per_message=1.0,
        steady=NONE,
        ideal_tok_s=400.0,
        loadavg=1.5,
    )


def test_the_table_has_a_cpu_column_per_process_and_blanks_off_the_path() -> None:
    cfg = MeshBenchConfig(concurrency="4")
    seconds = {p: 0.01 for p in PROCESSES} | {LOADGEN: 0.02}
    report = Report(cfg, {"cpus": 2}, [run(ROUTER_IDS, 10, seconds), run(GATEWAY, 10, seconds)])
    table = render(report)
    header = next(line for line in table.splitlines() if line.startswith("| conc"))
    for p in (*PROCESSES, "path", "loadgen"):
        assert f"{p} µs/tok" in header
    rows = [line for line in table.splitlines() if line.startswith("| 4 |")]
    assert len(rows) == 2
    cells = [c.strip() for c in rows[0].split("|")[1:-1]]
    columns = [c.strip() for c in header.split("|")[1:-1]]
    by_name = dict(zip(columns, cells))
    # router-ids: worker and router on the path; 0.01 s over 40 tokens = 250 µs each
    assert by_name["worker µs/tok"] == "250" and by_name["router µs/tok"] == "250"
    assert by_name["tokenizer µs/tok"] == "–" and by_name["gateway µs/tok"] == "–"
    assert by_name["path µs/tok"] == "500" and by_name["loadgen µs/tok"] == "500"
    assert by_name["x ideal"] == "0.050"  # 40 tokens in 2 s: 20 tok/s of 400
    figures = to_json(report)["runs"][1]
    assert set(figures["cpu_us_per_token"]) == {*PROCESSES, LOADGEN}
    assert figures["path"] == ["worker", "router", "tokenizer", "gateway"]
