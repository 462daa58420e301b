"""Host faults under load in the multi-host bed with a prefill and a decode on each of B and C
(``harness.testbed.faults``): B's links down mid-stream and back, every process of C killed at
once and started again, B's Consul agent cut off from the cluster while its services serve.

Each: requests in flight end with output or a clear error before their deadline, no page,
request or room is left on any worker; a partitioned host is out of routing within the routers'
health interval + 2 s; the host is used again after the repair (the time is reported). Only
``make test-multihost`` (PDMESH_MULTIHOST=full) runs them: they take minutes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from harness.chaos.load import LoadConfig, SteadyLoad, mixed_requests
from harness.testbed import BedConfig, MultiHostBed
from harness.testbed.faults import (
    CONSUL_PARTITION,
    KILL_HOST,
    LINK_DOWN,
    HostFaultResult,
    host_fault_table,
    run_host_fault,
)
from tests.multihost.conftest import REASON, needs_netns

pytestmark = [
    needs_netns,
    pytest.mark.model,
    pytest.mark.chaos,
    pytest.mark.skipif(
        os.environ.get("PDMESH_MULTIHOST") != "full",
        reason="host faults take minutes: make test-multihost runs them (PDMESH_MULTIHOST=full)",
    ),
]

DEADLINE_S = 30.0
CONCURRENCY = 8
HEALTH_CHECK_S = 1.0
MAX_INPUT, MAX_OUTPUT = 48, 32
CASES = [("b", LINK_DOWN), ("c", KILL_HOST), ("b", CONSUL_PARTITION)]
RESULTS: list[HostFaultResult] = []


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiHostBed]:
    assert REASON is None
    config = BedConfig(
        tmp_path_factory.mktemp("multihost-faults"),
        deadline_s=DEADLINE_S,
        health_check_s=HEALTH_CHECK_S,
        disagg_min_prompt_tokens=32,
        pairs=True,
    )
    bed = MultiHostBed(config).start()
    try:
        yield bed
    finally:
        failures = bed.stop()
        if RESULTS:
            print("\n" + host_fault_table(RESULTS))
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def load(bed: MultiHostBed) -> Iterator[SteadyLoad]:
    load = SteadyLoad(
        LoadConfig(bed.gateway_url, CONCURRENCY, DEADLINE_S),
        mixed_requests(64, MAX_INPUT, MAX_OUTPUT, seed=18),
    )
    load.start()
    try:
        yield load
    finally:
        load.stop()


@pytest.mark.parametrize(
    ("host", "fault"), CASES, ids=[f"{h}-{f.replace(' ', '-')}" for h, f in CASES]
)
def test_host_fault_under_load(bed: MultiHostBed, load: SteadyLoad, host: str, fault: str) -> None:
    result = run_host_fault(bed, load, host, fault)
    RESULTS.append(result)
    print("\n" + host_fault_table([result]))
    hit, meanwhile = result.in_flight, result.while_down
    assert hit.total > 0, f"nothing was in flight when {host} got {fault}"
    assert hit.past_deadline == 0 and meanwhile.past_deadline == 0, (hit, meanwhile)
    assert hit.unclear == 0 and meanwhile.unclear == 0, (hit.reasons, meanwhile.reasons)
    assert hit.unfinished == 0, hit
    assert not any(result.leaked_pages.values()), result.leaked_pages
    assert result.back_in_use_s is not None, f"{host} was not used again after the {fault}"
    if fault in (LINK_DOWN, KILL_HOST):
        assert result.out_of_routing_s is not None
        assert result.out_of_routing_s <= HEALTH_CHECK_S + 2.0, result.out_of_routing_s
