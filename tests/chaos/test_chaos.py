"""Chaos under load: one mesh (``tests/chaos/mesh.py``: Consul, tokenizer, two routers behind
the gateway, two aggregated workers and a prefill/decode pair, all real processes) with steady
load from the load generator, and each role hit in turn with ``kill -9`` and SIGTERM, plus a
worker stopped with SIGSTOP (a hung worker). For each fault:

- every request in flight ends with output or a clear error before its deadline (0 late);
- a worker's requests (migration on) complete: >= 99% (a SIGTERM drains them, a kill or a hang
  moves them to another worker);
- a SIGTERM-ed service exits 0 within its grace period;
- the role, restarted on its port (or SIGCONT-ed), serves again, and is used again — both
  timed;
- no KV page, request or room is left on any worker once the load pauses.

By default only a representative fault runs: a worker stopped with SIGSTOP (its requests move
on mid-stream, it comes back, nothing leaks), on a mesh without the PD pair. ``make chaos`` (PDMESH_CHAOS=full) runs the whole matrix and prints the table
docs/chaos.md shows (also written to $PDMESH_CHAOS_REPORT when set).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.chaos.load import LoadConfig, SteadyLoad, mixed_requests
from harness.chaos.report import FaultResult, chaos_table
from tests.chaos.mesh import WORKER_ROLES, ChaosMesh
from tests.chaos.scenario import KILL, STOP, TERM, run_fault

pytestmark = [pytest.mark.chaos, pytest.mark.model]

# "full": the whole matrix; "role:fault,...": those (fault: kill, term or stop); else DEFAULT
CHOICE = os.environ.get("PDMESH_CHAOS", "")
REPORT = os.environ.get("PDMESH_CHAOS_REPORT", "")
# "gpu": the load a GPU worker carries: 256 streams on model-free stepping workers (a token
# per request every 10 ms, thousands of tokens per second through the mesh); else 6 clients on
# the real model
GPU_LOAD = os.environ.get("PDMESH_CHAOS_LOAD", "") == "gpu"
DEADLINE_S = 30.0
CONCURRENCY = 256 if GPU_LOAD else 6
STEP_MS = 10.0 if GPU_LOAD else 0.0
# prompts of 12-48 tokens: those of 32 and more take the PD pair (when it is there)
MAX_INPUT, MAX_OUTPUT = 48, 32
MIN_COMPLETION = 0.99

ROLES = ("tokenizer", "router", "prefill", "decode", "worker", "gateway", "consul")
MATRIX = [(role, fault) for role in ROLES for fault in (KILL, TERM)] + [("worker", STOP)]
DEFAULT = [("worker", STOP)]
SHORT = {"kill": KILL, "term": TERM, "stop": STOP}


def _chosen() -> list[tuple[str, str]]:
    if CHOICE == "full":
        return MATRIX
    if not CHOICE:
        return DEFAULT
    return [(r, SHORT[f]) for r, f in (item.split(":") for item in CHOICE.split(","))]


# the stepping workers' mesh has no PD pair
CHOSEN = [(r, f) for r, f in _chosen() if not GPU_LOAD or r not in ("prefill", "decode")]
# the PD pair only when a chosen fault needs it (it costs two more model loads)
WITH_PD = CHOICE == "full" or any(role in ("prefill", "decode") for role, _ in CHOSEN)
RESULTS: list[FaultResult] = []


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosMesh]:
    mesh = ChaosMesh(
        tmp_path_factory.mktemp("chaos"), pd=WITH_PD, deadline_s=DEADLINE_S, stepping_ms=STEP_MS
    ).start()
    try:
        yield mesh
    finally:
        unclean = mesh.stop()
        if RESULTS:
            _report(chaos_table(RESULTS))
    assert not unclean, "\n".join(unclean)


@pytest.fixture(scope="module")
def load(mesh: ChaosMesh) -> Iterator[SteadyLoad]:
    gateway = mesh.member("gateway")
    config = LoadConfig(f"http://{gateway.address}", CONCURRENCY, DEADLINE_S)
    load = SteadyLoad(config, mixed_requests(64, MAX_INPUT, MAX_OUTPUT, seed=8))
    load.start()
    try:
        yield load
    finally:
        load.stop()


@pytest.mark.parametrize(("role", "fault"), CHOSEN, ids=[f"{r}-{f}" for r, f in CHOSEN])
def test_fault_under_load(mesh: ChaosMesh, load: SteadyLoad, role: str, fault: str) -> None:
    result = run_fault(mesh, load, role, fault)
    RESULTS.append(result)
    hit, down = result.in_flight, result.while_down
    assert hit.total > 0, f"nothing was in flight when {role} got {fault}"
    assert hit.past_deadline == 0 and down.past_deadline == 0, (hit, down)
    assert hit.unclear == 0 and down.unclear == 0, (hit.reasons, down.reasons)
    assert hit.unfinished == 0, hit
    if role in (*WORKER_ROLES, "router"):
        # a worker's requests survive it: drained, retried before their first token, or
        # migrated mid-stream; a router's too: the gateway resumes its streams on the other
        assert hit.completion_rate >= MIN_COMPLETION, hit.describe_reasons()
    if fault == TERM and role != "consul":
        assert result.exit_code == 0, f"{role} exited with {result.exit_code} after SIGTERM"
    assert not any(result.leaked_pages.values()), result.leaked_pages


def _report(table: str) -> None:
    print("\n" + table)
    if REPORT:
        Path(REPORT).parent.mkdir(parents=True, exist_ok=True)
        Path(REPORT).write_text(table + "\n")
