"""Consul discovery against a real ``consul agent -dev`` and real grpc.aio servers.

Each agent runs on free loopback ports (``ConsulDevAgent``); a test that kills its agent gets
its own. The servers are ``pdmesh.rpc.RpcServer``s, so Consul's native gRPC check asks the same
``grpc.health.v1`` service every pdmesh service runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.discovery import (
    ConsulDiscovery,
    DiscoveryConfig,
    Endpoint,
    ServiceRegistration,
    make_discovery,
    registration_for,
    serve_registered,
)
from pdmesh.discovery.consul_api import ConsulError
from pdmesh.discovery.dev_agent import ConsulDevAgent, free_port
from pdmesh.rpc.server import RpcServer

CHECK_INTERVAL = 1.0  # Consul's minimum
WAIT = 15.0  # generous: first checks are staggered within the interval, CI machines are slow


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulDevAgent]:
    with ConsulDevAgent() as running:
        yield running


@pytest.fixture
def own_agent() -> Iterator[ConsulDevAgent]:
    """An agent this test may kill and restart."""
    with ConsulDevAgent() as running:
        yield running


class Recorder:
    """An ``on_change`` that keeps every set it was given."""

    def __init__(self) -> None:
        self.sets: list[frozenset[Endpoint]] = []
        self._changed = asyncio.Event()

    def __call__(self, endpoints: frozenset[Endpoint]) -> None:
        self.sets.append(endpoints)
        self._changed.set()

    @property
    def ids(self) -> set[str]:
        return {e.id for e in self.sets[-1]} if self.sets else set()

    async def until(self, predicate: Callable[[set[str]], bool], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not predicate(self.ids):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"watch never matched; sets seen: {self.sets}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)


async def start_server() -> tuple[RpcServer, int]:
    rpc = RpcServer(["pdmesh.test.Dummy"])
    return rpc, await rpc.start("127.0.0.1", 0)


def consul(agent: ConsulDevAgent, **kwargs: Any) -> ConsulDiscovery:
    return ConsulDiscovery(agent.http_addr, check_interval=CHECK_INTERVAL, **kwargs)


def test_register_check_watch_deregister(agent: ConsulDevAgent) -> None:
    async def scenario() -> None:
        rpc, port = await start_server()
        discovery = consul(agent)
        registration = ServiceRegistration(
            "pdmesh-test-a",
            "127.0.0.1",
            port,
            tags=("decode",),
            meta={"model": "tiny", "page_size": "16"},
        )
        seen = Recorder()
        watch = discovery.watch("pdmesh-test-a", "decode", seen)
        other_tag = Recorder()
        discovery.watch("pdmesh-test-a", "prefill", other_tag)
        try:
            await discovery.register(registration)
            await seen.until(lambda ids: registration.service_id in ids)
            (endpoint,) = seen.sets[-1]
            assert endpoint == Endpoint(
                registration.service_id, "127.0.0.1", port, ("decode",), dict(registration.meta)
            )
            # passing through Consul's own gRPC health check, not just registered
            checks = agent.get("/v1/agent/checks")
            assert isinstance(checks, dict)
            (check,) = [c for c in checks.values() if c["ServiceID"] == registration.service_id]
            assert (check["Type"], check["Status"]) == ("grpc", "passing")

            # NOT_SERVING (as while draining) → critical → out of the passing set; and back
            await rpc.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
            await seen.until(lambda ids: not ids)
            await rpc.health.set("", health_pb2.HealthCheckResponse.SERVING)
            await seen.until(lambda ids: registration.service_id in ids)

            await discovery.deregister(registration)
            await seen.until(lambda ids: not ids, timeout=5.0)
            assert registration.service_id not in agent.get("/v1/agent/services")  # type: ignore[operator]
            assert other_tag.sets == [frozenset()]  # the tag filter held throughout
            assert watch.endpoints == frozenset()
        finally:
            await discovery.close()
            await rpc.stop(0)

    asyncio.run(scenario())


def test_outage_keeps_last_set_and_recovers(
    own_agent: ConsulDevAgent, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pdmesh.discovery")

    async def scenario() -> None:
        rpc, port = await start_server()
        discovery = consul(own_agent, retry_min=0.2, retry_max=1.0, resync_interval=1.0)
        registration = ServiceRegistration("pdmesh-test-outage", "127.0.0.1", port)
        seen = Recorder()
        watch = discovery.watch(registration.name, None, seen)
        try:
            await discovery.register(registration)
            await seen.until(lambda ids: registration.service_id in ids)
            before = list(seen.sets)

            own_agent.kill()
            await asyncio.sleep(4.0)  # several failed retries
            assert seen.sets == before, "an outage must not change the delivered set"
            assert {e.id for e in watch.endpoints} == {registration.service_id}
            outage_warnings = [r for r in caplog.records if "keeping the last 1" in r.message]
            assert len(outage_warnings) == 1, "the outage is logged once, not per retry"

            await asyncio.to_thread(own_agent.start)
            # the watch is live again: a newcomer shows up. The dev agent came back empty, so
            # the first instance is there again only because its keeper registered it anew.
            newcomer_rpc, newcomer_port = await start_server()
            newcomer = ServiceRegistration(registration.name, "127.0.0.1", newcomer_port)
            await discovery.register(newcomer)
            both = {registration.service_id, newcomer.service_id}
            await seen.until(lambda ids: ids == both)
            assert any("reachable again" in r.message for r in caplog.records)
            await newcomer_rpc.stop(0)
        finally:
            await discovery.close()
            await rpc.stop(0)

    asyncio.run(scenario())


def test_serve_registered_deregisters_before_draining(agent: ConsulDevAgent) -> None:
    """SIGTERM: the instance leaves Consul at once while an in-flight call still drains."""
    config = DiscoveryConfig(
        discovery="consul", consul_addr=agent.http_addr, consul_check_interval=CHECK_INTERVAL
    )
    registration = registration_for(config, "pdmesh-test-serve", "127.0.0.1", 0, tags=("agg",))

    async def scenario() -> None:
        watcher = make_discovery(config)
        seen = Recorder()
        watcher.watch(registration.name, "agg", seen)
        rpc = RpcServer(["pdmesh.test.Dummy"])
        serving = asyncio.create_task(
            serve_registered(rpc, "127.0.0.1", 0, 10.0, make_discovery(config), registration)
        )
        try:
            await seen.until(lambda ids: len(ids) == 1)
            (endpoint,) = seen.sets[-1]
            assert endpoint.port != 0 and endpoint.tags == ("agg",)
            # a long call in flight: Health.Watch streams until the server stops
            async with grpc.aio.insecure_channel(endpoint.target) as channel:
                stream = health_pb2_grpc.HealthStub(channel).Watch(
                    health_pb2.HealthCheckRequest(service="")
                )
                await stream.read()
                os.kill(os.getpid(), signal.SIGTERM)
                await seen.until(lambda ids: not ids, timeout=5.0)
                assert not serving.done(), "deregistered only after draining"
                stream.cancel()
            await asyncio.wait_for(serving, 15.0)
        finally:
            serving.cancel()
            await watcher.close()

    asyncio.run(scenario())


ACL_HCL = 'acl { enabled = true, default_policy = "deny", tokens { master = "root-secret" } }'


def test_acl_token_from_flag_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    with ConsulDevAgent(extra_args=["-hcl", ACL_HCL]) as agent:

        async def scenario() -> None:
            rpc, port = await start_server()
            registration = ServiceRegistration("pdmesh-test-acl", "127.0.0.1", port)
            denied = make_discovery(DiscoveryConfig("consul", agent.http_addr))
            with pytest.raises(ConsulError) as info:
                await denied.register(registration)
            assert info.value.status == 403
            assert "refused to register pdmesh-test-acl" in str(info.value)
            await denied.close()

            # a service whose registration is refused stops its server and fails loudly
            refused_rpc = RpcServer(["pdmesh.test.Dummy"])
            denied_config = DiscoveryConfig("consul", agent.http_addr)
            refused_port = free_port()
            with pytest.raises(ConsulError):
                await serve_registered(
                    refused_rpc,
                    "127.0.0.1",
                    refused_port,
                    0.0,
                    make_discovery(denied_config),
                    registration_for(denied_config, "pdmesh-test-acl", "127.0.0.1", 0),
                )
            async with grpc.aio.insecure_channel(f"127.0.0.1:{refused_port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as stopped:
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                assert stopped.value.code() == grpc.StatusCode.UNAVAILABLE

            by_flag = make_discovery(DiscoveryConfig("consul", agent.http_addr, "root-secret"))
            await by_flag.register(registration)
            await by_flag.deregister(registration)
            await by_flag.close()

            monkeypatch.setenv("CONSUL_HTTP_TOKEN", "root-secret")
            monkeypatch.setenv("CONSUL_HTTP_ADDR", agent.http_addr)
            by_env = make_discovery(DiscoveryConfig("consul", consul_check_interval=1.0))
            seen = Recorder()
            by_env.watch(registration.name, None, seen)
            await by_env.register(registration)
            await seen.until(lambda ids: registration.service_id in ids)
            await by_env.close()
            await rpc.stop(0)

        asyncio.run(scenario())
