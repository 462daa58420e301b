"""The router's limit and metrics flags, its Prometheus families fed by real routing objects
(policies, breakers, the worker set), and removing a worker evicting its tree entries from
every policy (aggregated, PD prefill and PD decode). No processes, no network."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.routing import (
    CacheAware,
    CacheAwareConfig,
    CircuitBreakerConfig,
    CircuitBreakers,
    RequestView,
)
from pdmesh.routing.admission import AdmissionConfig
from pdmesh.telemetry.router_metrics import RouterMetrics
from services.router.__main__ import _configs, build_parser
from services.router.config import DEFAULT_MAX_PAYLOAD_SIZE, RouterServiceConfig
from services.router.generate import Generation
from services.router.server import worker_gauges
from services.router.workers import WorkerSet


def parse(*argv: str) -> RouterServiceConfig:
    return _configs(build_parser().parse_args(list(argv)))[0]


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of ``registry`` as exposed (parsed back from the text format)."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# -- flags ------------------------------------------------------------------------------------


def test_limit_flags_default_to_the_sglang_routers() -> None:
    cfg = parse()
    assert cfg.admission_config() == AdmissionConfig(256, 100, 60.0)
    assert cfg.max_payload_size == DEFAULT_MAX_PAYLOAD_SIZE == 256 * 1024 * 1024
    assert cfg.request_timeout_secs == 600.0
    assert cfg.metrics_address(-1) == ("127.0.0.1", -1)  # no /metrics unless asked


def test_limit_flags_reach_the_admission_config() -> None:
    cfg = parse(
        "--max-concurrent-requests", "-1", "--queue-size", "0", "--queue-timeout-secs", "2.5",
        "--max-payload-size", "1024", "--request-timeout-secs", "30",
    )  # fmt: skip
    assert cfg.admission_config() == AdmissionConfig(-1, 0, 2.5)
    assert cfg.admission_config().unlimited
    assert (cfg.max_payload_size, cfg.request_timeout_secs) == (1024, 30)
    assert parse("--request-timeout", "12").request_timeout_secs == 12  # the old spelling


def test_prometheus_flags_and_metrics_port_name_one_server() -> None:
    cfg = parse("--prometheus-port", "29000", "--prometheus-host", "0.0.0.0")
    assert cfg.metrics_address(-1) == ("0.0.0.0", 29000)
    assert cfg.metrics_address(29000) == ("0.0.0.0", 29000)
    assert parse("--metrics-port", "9100").metrics_address(9100) == ("127.0.0.1", 9100)
    with pytest.raises(ValueError, match="--prometheus-port=1 and --metrics-port=2"):
        parse("--prometheus-port", "1", "--metrics-port", "2")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--queue-size", "-1"), "queue_size"),
        (("--queue-timeout-secs", "0"), "queue_timeout_secs"),
        (("--max-payload-size", "0"), "--max-payload-size"),
        (("--request-timeout-secs", "0"), "--request-timeout-secs"),
        (("--prometheus-port", "70000"), "--prometheus-port"),
    ],
)
def test_bad_limit_flags_fail_at_startup(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse(*argv)


def test_help_explains_every_new_flag() -> None:
    text = build_parser().format_help()
    for name in (
        "--max-concurrent-requests", "--queue-size", "--queue-timeout-secs",
        "--request-timeout-secs", "--max-payload-size", "--prometheus-host",
        "--prometheus-port", "--request-timeout ",
    ):  # fmt: skip
        assert name in text


# -- metrics from the routing objects -----------------------------------------------------------


def test_routing_decisions_and_cache_match_are_counted() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics()
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        for name in ("a", "b"):
            workers.add(f"127.0.0.1:{ord(name)}", id=name).healthy = True
        policy = CacheAware(CacheAwareConfig(cache_threshold=0.5))
        gen = Generation(workers, policy, cast(Any, None), metrics=metrics)
        try:
            prompt = list(range(10))
            first = gen._choose(policy, workers.all(), RequestView(prompt))
            again = gen._choose(policy, workers.all(), RequestView([*prompt[:8], 99, 98]))
            assert again is first  # 8 of 10 tokens matched: above the threshold
        finally:
            await workers.close()
        got = samples(metrics.registry)
        label = (("policy", "cache_aware"), ("worker", first.id))
        assert got[("pdmesh_router_routing_decisions_total", label)] == 2
        ca = (("policy", "cache_aware"),)
        assert got[("pdmesh_router_cache_prompt_tokens_total", ca)] == 20
        assert got[("pdmesh_router_cache_matched_tokens_total", ca)] == 8
        assert got[("pdmesh_router_cache_match_ratio_count", ca)] == 2
        assert got[("pdmesh_router_cache_match_ratio_bucket", (("le", "0.0"), *ca))] == 1

    asyncio.run(scenario())


def test_worker_gauges_follow_load_circuit_health_and_removal() -> None:
    async def scenario() -> None:
        metrics = RouterMetrics()
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        a = workers.add("127.0.0.1:1", id="a")
        workers.add("127.0.0.1:2", role="prefill", id="p")
        a.healthy = True
        breakers = CircuitBreakers(CircuitBreakerConfig(failure_threshold=1))
        gen = Generation(workers, CacheAware(), cast(Any, None), breakers=breakers)
        workers.on_remove.append(gen.forget_worker)
        metrics.watch_workers(lambda: worker_gauges(gen))
        gen.loads.start("a", 5)
        gen.loads.start("a", 5)
        breakers.record_failure("p")
        try:
            got = samples(metrics.registry)
            a_labels = (("role", "aggregated"), ("worker", "a"))
            p_labels = (("role", "prefill"), ("worker", "p"))
            assert got[("pdmesh_router_worker_in_flight", a_labels)] == 2
            assert got[("pdmesh_router_worker_in_flight", p_labels)] == 0
            assert got[("pdmesh_router_worker_circuit_state", a_labels)] == 0  # closed
            assert got[("pdmesh_router_worker_circuit_state", p_labels)] == 1  # open
            assert got[("pdmesh_router_worker_healthy", a_labels)] == 1
            assert got[("pdmesh_router_worker_healthy", p_labels)] == 0
            workers.remove(id="p")
            after = samples(metrics.registry)
            assert ("pdmesh_router_worker_in_flight", p_labels) not in after
            assert ("pdmesh_router_worker_in_flight", a_labels) in after
        finally:
            await workers.close()

    asyncio.run(scenario())


def test_removing_a_worker_evicts_it_from_every_policys_tree() -> None:
    async def scenario() -> None:
        workers = WorkerSet(rpc_timeout=1.0, drain_timeout=0.0)
        for name, role in (("w", "aggregated"), ("p", "prefill"), ("d", "decode")):
            workers.add(f"127.0.0.1:{ord(name)}", role=role, id=name).healthy = True
        policy, prefill, decode = CacheAware(), CacheAware(), CacheAware()
        gen = Generation(
            workers, policy, cast(Any, None), prefill_policy=prefill, decode_policy=decode
        )
        workers.on_remove.append(gen.forget_worker)
        prompt = RequestView(list(range(32)))
        by_id = {w.id: w for w in workers.all()}
        for p in (policy, prefill, decode):
            for name in ("w", "p", "d"):
                gen._choose(p, [by_id[name]], prompt)  # each tree learns every worker
            assert all(p.tree.tenant_size(name) == 32 for name in ("w", "p", "d"))
        gen.loads.start("p", 32)
        try:
            for name in ("w", "p", "d"):
                assert workers.remove(id=name)
                for p in (policy, prefill, decode):
                    assert p.tree.tenant_size(name) == 0
                    assert name not in p.tree.match_per_tenant(prompt.token_ids)
            assert gen.loads.get("p").in_flight == 0
            assert all(p.tree.node_count() <= 1 for p in (policy, prefill, decode))
        finally:
            await workers.close()

    asyncio.run(scenario())
