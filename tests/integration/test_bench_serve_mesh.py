"""``bench serve`` against the real mesh (tokenizer, worker, router as processes), over gRPC.

A short run with token-id prompts and ``--ignore-eos``, so every count is exact: what the
router's usage reports must equal what the load generator drew.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.serve.__main__ import main
from tests.integration.procs import ServiceProc

pytestmark = [pytest.mark.model, pytest.mark.bench]


def test_bench_serve_grpc_on_the_mesh(router_proc: ServiceProc, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = ["--backend", "grpc", "--grpc-target", router_proc.address, "--input-format",
            "token-ids", "--num-prompts", "4", "--random-input-len", "16",
            "--random-output-len", "6", "--random-range-ratio", "0.5", "--ignore-eos",
            "--max-concurrency", "2", "--slo-ttft-ms", "600000", "--no-progress",
            "--output-json", str(out), "--output-details"]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    s, reqs = doc["summary"], doc["requests"]
    assert (s["completed"], s["failed"], s["good_requests"]) == (4, 0, 4), s["errors"]
    assert s["usage_reported"] == 4 and s["output_len_mismatch"] == 0
    for r in reqs:
        assert r["prompt_tokens"] == r["prompt_len"]  # the router saw exactly the drawn ids
        assert r["output_tokens"] == r["expected_output_len"]  # ignore_eos made it exact
        assert r["finish_reason"] == "length"
        assert r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"]
        # one gap per token after the first (fewer if the first message carried several)
        assert 0 < len(r["itl_s"]) <= r["output_tokens"] - 1
    assert s["ttft_ms"]["count"] == 4 and s["e2e_ms"]["count"] == 4
