"""``python -m benchmarks vs-smg``'s capacity workload with real processes: fresh pdmesh
workers per arm, pdmesh's router + gateway and smg (gRPC mode) each with ``cache_aware``, the
same requests through both, hit rates read from the workers."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import smg
from benchmarks.serve.tokenizer import BenchTokenizer
from benchmarks.smg_config import SmgBenchConfig
from pdmesh.models.fetch import ensure_default_model

pytestmark = [pytest.mark.model, pytest.mark.bench]

TENANTS, PER_TENANT = 2, 3


def test_capacity_workload_through_pdmesh_and_smg(tmp_path: Path) -> None:
    """Two tenants on two fresh workers at concurrency 1: pdmesh's cache_aware keeps each
    tenant on one worker (the second tenant goes to the worker with the smaller tree), so it
    reaches the best possible hit rate; smg serves the same requests and finds some prefixes
    cached too. Every request is counted by exactly one worker's /metrics."""
    cfg = SmgBenchConfig(
        random_workload=False,
        shared_prefix=False,
        capacity_workers=2,
        capacity_num_pages=32,
        capacity_tenants=TENANTS,
        capacity_prompts_per_tenant=PER_TENANT,
        capacity_system_prompt_len=48,
        capacity_question_len=8,
        capacity_output_len=2,
        capacity_concurrency=1,
        capacity_reference=False,
        startup_timeout=120,
        request_timeout=60,
        log_dir=str(tmp_path),
        progress=False,
    )
    report = smg.Report(cfg)
    smg.run(cfg, BenchTokenizer.from_path(ensure_default_model(progress=False)), report)
    runs = {r.arm: r for r in report.capacity.runs}
    assert sorted(runs) == ["pdmesh", "smg"]
    n = TENANTS * PER_TENANT
    for run in runs.values():
        assert (run.summary.completed, run.summary.failed) == (n, 0), run.summary.errors
        assert sorted(run.requests_served) in ([0, n], [PER_TENANT, PER_TENANT], [2, 4], [1, 5])
        assert sum(run.requests_served) == n
        assert 0 < run.hit_rate <= run.best_hit_rate < 1
    # both arms sent the same prompts (the same token counts at the workers)
    assert runs["pdmesh"].summary.total_input_tokens == runs["smg"].summary.total_input_tokens
    pdmesh = runs["pdmesh"]
    assert pdmesh.hit_rate == pytest.approx(pdmesh.best_hit_rate)
    assert sorted(pdmesh.requests_served) == [PER_TENANT, PER_TENANT]  # one tenant each
    table = smg.render(report)
    assert "capacity workload" in table and "hit rate pdmesh / smg" in table
