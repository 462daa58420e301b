"""``python -m benchmarks mesh`` end to end with real processes: the model-free stepping worker
(the real worker servicer), the real tokenizer, router and gateway, each arm driven by
``benchmarks.serve``'s clients. Asserts what was delivered and that the CPU figures are
there, never how fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as bench
from benchmarks.mesh.cpu import LOADGEN
from benchmarks.mesh.procs import PATHS

pytestmark = [
    pytest.mark.model,
    pytest.mark.bench,
]  # the default model's tokenizer (converted once into the cache)

CONCURRENCY, OUTPUT_LEN, REQUESTS = 4, 16, 8
PDMESH_ARMS = ("direct", "router-ids", "router-text", "gateway")


def run_bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> dict[str, Any]:
    out = tmp_path / "mesh.json"
    argv = [
        "mesh", "--concurrency", str(CONCURRENCY), "--output-len", str(OUTPUT_LEN),
        "--prompt-len", "32", "--step-ms", "5", "--num-requests", str(REQUESTS),
        "--startup-timeout", "120", "--request-timeout", "60",
        "--log-dir", str(tmp_path / "logs"), "--output", str(out), *extra,
    ]  # fmt: skip
    assert bench.main(argv) == 0
    table = capsys.readouterr().out
    assert "| conc | arm |" in table and "load average" in table
    return dict(json.loads(out.read_text()), table=table)


def assert_delivered(run: dict[str, Any]) -> None:
    label = f"{run['arm']}: {run['errors']} {run['warmup_error']}"
    assert (run["completed"], run["failed"], run["output_len_mismatch"]) == (REQUESTS, 0, 0), label
    assert run["tokens"] == REQUESTS * OUTPUT_LEN, label
    assert run["summary"]["total_output_tokens"] == REQUESTS * OUTPUT_LEN


def test_every_pdmesh_arm_delivers_every_token_with_cpu_per_process(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_bench(tmp_path, capsys, "--arms", ",".join(PDMESH_ARMS))
    runs = {r["arm"]: r for r in result["runs"]}
    assert sorted(runs) == sorted(PDMESH_ARMS) and result["skipped"] == {}
    for arm, run in runs.items():
        assert_delivered(run)
        assert run["concurrency"] == CONCURRENCY
        assert run["ideal_tok_s"] == pytest.approx(CONCURRENCY * 1000 / 5)
        # a CPU figure for every process of the mesh and the load generator itself
        assert set(run["cpu_seconds"]) >= {*PATHS[arm], LOADGEN}
        assert set(run["cpu_us_per_token"]) >= {*PATHS["gateway"], LOADGEN}
        assert all(run["cpu_seconds"][p] >= 0 for p in PATHS[arm])
        assert run["cpu_us_per_token"][LOADGEN] > 0  # it sent and read every request
    # the text arms really produced text: the detokenizer had words to decode
    assert runs["router-text"]["summary"]["total_output_tokens"] == REQUESTS * OUTPUT_LEN
    table = result["table"]
    for header in ("worker µs/tok", "router µs/tok", "tokenizer µs/tok", "gateway µs/tok"):
        assert header in table
    assert "loadgen µs/tok" in table and "loadgen cores" in table


def test_several_client_processes_merge_their_results(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_bench(tmp_path, capsys, "--arms", "direct", "--client-processes", "2")
    (run,) = result["runs"]
    assert_delivered(run)
    assert run["cpu_us_per_token"][LOADGEN] > 0  # both processes' CPU, reported back


def test_the_smg_arm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("smg", reason="smg (SGLang's gateway, a dev extra) is not installed")
    result = run_bench(tmp_path, capsys, "--arms", "smg")
    if result["skipped"]:  # smg cannot serve this worker: the run says why and goes on
        assert "smg" in result["skipped"] and "skipped" in result["table"]
        return
    (run,) = result["runs"]
    assert_delivered(run)
    assert set(run["cpu_seconds"]) >= {"worker", "smg", LOADGEN}
