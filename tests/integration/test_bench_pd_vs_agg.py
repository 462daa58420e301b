"""``python -m benchmarks pd-vs-agg`` at tiny scale on the CPU: both topologies as real
processes (prefill + decode with real Mooncake over tcp; two aggregated workers), the mixed
workload through the real router, and the report's structure, counts and end state.

Nothing here is about speed: the figures of a 2-core machine mean nothing; that every request
was served, every prompt of 1p1d went through a KV transfer, and every page came back does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.pd_vs_agg.main import main
from benchmarks.pd_vs_agg.report import ROWS
from benchmarks.pd_vs_agg.workload import WARMUP_REQUESTS

pytestmark = pytest.mark.bench

STREAMS = 2
LONGS = 3
FIGURES = {key for key, _ in ROWS} | {"duration_s"}


def test_pd_vs_agg_report_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "pd_vs_agg.json"
    printed: list[str] = []
    argv = ["--model", "random:tiny", "--device", "cpu", "--num-pages", "128",
            "--max-model-len", "1024", "--max-running-requests", "8",
            "--max-num-batched-tokens", "128", "--stream-clients", str(STREAMS),
            "--stream-input-len", "8", "--stream-output-len", "16",
            "--long-requests", str(LONGS), "--long-input-min", "256", "--long-input-max", "400",
            "--long-output-len", "4", "--long-rate", "8", "--disagg-min-prompt-tokens", "100",
            "--startup-timeout", "120",
            "--request-timeout", "60", "--log-dir", str(tmp_path / "logs"), "--no-progress",
            "--json-out", str(out)]  # fmt: skip
    assert main(argv, out=printed.append) == 0
    table = printed[0]
    for _, label in ROWS:
        assert label in table
    assert "1p1d/2agg" in table and "KV transfer (auto: mooncake)" in table

    doc = json.loads(out.read_text())
    assert [r["topology"] for r in doc["runs"]] == ["1p1d", "2agg"]
    for run in doc["runs"]:
        f = run["figures"]
        assert set(f) == FIGURES
        assert (f["failed"], f["long_requests"]) == (0, LONGS), run["summaries"]["all"]["errors"]
        assert f["stream_requests"] >= STREAMS  # each client ran at least once
        assert f["ttft_long_p50_ms"] > 0 and f["itl_p99_ms"] >= f["itl_p50_ms"] > 0
        assert f["output_tok_s"] > 0
        # ignore_eos and token ids: the server produced exactly what was asked
        assert run["summaries"]["all"]["output_len_mismatch"] == 0
        for name, load in run["loads_after"].items():  # nothing left behind on any worker
            idle = (load["num_running"], load["num_waiting"], load["num_rooms"], load["num_held"])
            assert idle == (0, 0, 0, 0), (name, load)
            assert load["num_free_pages"] == load["num_total_pages"], (name, load)

    pd, agg = doc["runs"]
    # --disagg-min-prompt-tokens 100: the long prompts were prefilled remotely and their KV
    # moved, the streams' 8-token prompts were prefilled on the decode worker
    assert pd["transfer"]["rooms"] == pd["transfer"]["long_rooms"] == LONGS
    assert pd["transfer"]["bytes"] > 0
    # one room per remote prefill, the long warmups' included
    assert pd["loads_after"]["1p1d-decode"]["total_rooms"] == LONGS + WARMUP_REQUESTS
    assert agg["transfer"] is None
    assert all(load["total_rooms"] == 0 for load in agg["loads_after"].values())

    assert set(doc["medians"]) == {"1p1d", "2agg"}
    assert set(doc["ratios_1p1d_over_2agg"]) == {key for key, _ in ROWS}
    ratio = doc["ratios_1p1d_over_2agg"]["itl_p99_ms"]
    assert ratio == doc["medians"]["1p1d"]["itl_p99_ms"] / doc["medians"]["2agg"]["itl_p99_ms"]
    assert set(doc["targets"]) == {
        "itl_p99_ratio", "itl_p99_met", "output_throughput_ratio", "output_throughput_met",
    }  # fmt: skip
    assert doc["targets"]["itl_p99_met"] == (ratio <= 0.5)
