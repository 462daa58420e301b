"""Discovery without a Consul agent: payloads, parsing, config precedence, the static backend
and the add/remove diffing a router hangs its worker set on."""

from __future__ import annotations

import argparse
import asyncio

import pytest

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import (
    DiscoveryConfig,
    Endpoint,
    ServiceRegistration,
    StaticDiscovery,
    diffing,
    endpoints_from_addresses,
    make_discovery,
    registration_for,
)
from pdmesh.discovery.consul import (
    ConsulDiscovery,
    duration,
    endpoint_from_catalog,
    endpoint_from_entry,
    service_definition,
)
from pdmesh.discovery.consul_api import parse_consul_addr


def test_grpc_registration_payload() -> None:
    registration = ServiceRegistration(
        "pdmesh-worker",
        "10.0.0.5",
        50053,
        tags=("decode",),
        meta={"model": "smollm2", "page_size": "16"},
    )
    assert service_definition(registration, 2.0, 90.0) == {
        "ID": "pdmesh-worker-10.0.0.5-50053",
        "Name": "pdmesh-worker",
        "Address": "10.0.0.5",
        "Port": 50053,
        "Tags": ["decode"],
        "Meta": {"model": "smollm2", "page_size": "16"},
        "Check": {
            "Name": "pdmesh-worker grpc health",
            "GRPC": "10.0.0.5:50053",
            "GRPCUseTLS": False,
            "Interval": "2s",
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "90s",
        },
    }


def test_http_and_no_check_payloads() -> None:
    gateway = ServiceRegistration("pdmesh-gateway", "::1", 8000, id="gw-1", check="http")
    body = service_definition(gateway, 0.5, 60.0)
    assert body["ID"] == "gw-1"
    assert body["Check"] == {
        "Name": "pdmesh-gateway http health",
        "HTTP": "http://[::1]:8000/health",
        "Method": "GET",
        "Interval": "500ms",
        "Timeout": "500ms",
        "DeregisterCriticalServiceAfter": "60s",
    }
    assert "Check" not in service_definition(ServiceRegistration("x", "h", 1, check="none"), 1, 60)
    # a slow interval does not make each check wait that long
    slow = service_definition(ServiceRegistration("x", "h", 1), 30.0, 60.0)
    assert slow["Check"]["Timeout"] == "5s"


def test_duration() -> None:
    assert [duration(s) for s in (1, 2.0, 0.25, 1.5, 90)] == ["1s", "2s", "250ms", "1500ms", "90s"]


def test_registration_validation_and_ids() -> None:
    with pytest.raises(ValueError, match="advertise-address"):
        ServiceRegistration("pdmesh-worker", "0.0.0.0", 1)
    with pytest.raises(ValueError, match="meta key"):
        ServiceRegistration("pdmesh-worker", "h", 1, meta={"bad key": "v"})
    with pytest.raises(ValueError, match="port"):
        ServiceRegistration("pdmesh-worker", "h", 70000)
    ipv6 = ServiceRegistration("pdmesh-router", "fe80::1", 50051)
    assert ipv6.service_id == "pdmesh-router-fe80-1-50051"
    assert ipv6.target == "[fe80::1]:50051"
    assert ipv6.with_port(9).service_id == "pdmesh-router-fe80-1-9"


@pytest.mark.parametrize(
    ("given", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:8500"),
        ("consul:8501", "http://consul:8501"),
        ("https://consul.example:8501", "https://consul.example:8501"),
        ("http://[::1]:8500", "http://[::1]:8500"),
        ("  localhost:18500 ", "http://localhost:18500"),
    ],
)
def test_parse_consul_addr(given: str, url: str) -> None:
    assert parse_consul_addr(given) == url


@pytest.mark.parametrize("bad", ["", "ftp://h:1", "h:notaport", "http://h:1/path"])
def test_parse_consul_addr_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_consul_addr(bad)


def parse(argv: list[str]) -> DiscoveryConfig:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, DiscoveryConfig)
    return from_args(DiscoveryConfig, parser.parse_args(argv))


def test_config_flag_beats_env_beats_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CONSUL_HTTP_ADDR", raising=False)
    monkeypatch.delenv("CONSUL_HTTP_TOKEN", raising=False)
    assert parse([]).resolved_consul_addr() == "127.0.0.1:8500"
    assert parse([]).resolved_consul_token() == ""
    monkeypatch.setenv("CONSUL_HTTP_ADDR", "env-host:8500")
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "env-token")
    from_env = parse(["--discovery", "consul"])
    assert (from_env.consul_addr, from_env.consul_token) == ("env-host:8500", "env-token")
    by_flag = parse(["--consul-addr", "flag-host:1", "--consul-token", "flag-token"])
    assert by_flag.resolved_consul_addr() == "flag-host:1"
    assert by_flag.resolved_consul_token() == "flag-token"
    # configs built in code (not through flags) still honour the variables
    assert DiscoveryConfig().resolved_consul_addr() == "env-host:8500"
    assert DiscoveryConfig().resolved_consul_token() == "env-token"


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="--discovery"):
        DiscoveryConfig(discovery="etcd")
    with pytest.raises(ValueError, match="Consul's minimum"):
        DiscoveryConfig(consul_deregister_after=10)
    with pytest.raises(ValueError, match="check-interval"):
        DiscoveryConfig(consul_check_interval=0)


def test_registration_for_merges_tags_and_meta(monkeypatch: pytest.MonkeyPatch) -> None:
    config = DiscoveryConfig(service_tags="canary, decode,", advertise_address="10.1.2.3")
    registration = registration_for(
        config,
        "pdmesh-worker",
        "0.0.0.0",
        0,
        tags=("decode",),
        meta={"page_size": 16, "model": "m", "bootstrap_port": None, "kv_transfer": ""},
    )
    assert registration.address == "10.1.2.3"
    assert registration.tags == ("decode", "canary")
    assert registration.meta == {"page_size": "16", "model": "m"}
    assert registration.with_port(5).service_id == "pdmesh-worker-10.1.2.3-5"
    # no --advertise-address: the listen host, unless it is a wildcard
    assert DiscoveryConfig().advertised("127.0.0.1") == "127.0.0.1"
    monkeypatch.setattr("socket.gethostname", lambda: "localhost")
    assert DiscoveryConfig().advertised("0.0.0.0") == "127.0.0.1"


def test_endpoint_parsing() -> None:
    entry = {
        "Node": {"Address": "10.0.0.9"},
        "Service": {"ID": "w1", "Address": "", "Port": 50053, "Tags": None, "Meta": None},
    }
    assert endpoint_from_entry(entry) == Endpoint("w1", "10.0.0.9", 50053)
    node = {
        "Address": "10.0.0.9",
        "ServiceID": "w2",
        "ServiceAddress": "10.0.0.7",
        "ServicePort": 1,
        "ServiceTags": ["prefill"],
        "ServiceMeta": {"model": "m"},
    }
    assert endpoint_from_catalog(node) == Endpoint(
        "w2", "10.0.0.7", 1, ("prefill",), {"model": "m"}
    )
    # meta is compared (a re-registration with new meta is a change) but not hashed
    assert Endpoint("a", "h", 1, meta={"x": "1"}) != Endpoint("a", "h", 1, meta={"x": "2"})
    assert len({Endpoint("a", "h", 1, meta={"x": "1"}), Endpoint("a", "h", 1)}) == 2


def test_endpoints_from_addresses() -> None:
    assert endpoints_from_addresses("a:1, [::1]:2,") == {
        Endpoint("a:1", "a", 1),
        Endpoint("[::1]:2", "::1", 2),
    }
    assert Endpoint("[::1]:2", "::1", 2).target == "[::1]:2"
    with pytest.raises(ValueError, match="host:port"):
        endpoints_from_addresses("nohost")


def test_static_backend_delivers_once_with_tag_filter() -> None:
    async def scenario() -> None:
        decode = Endpoint("d", "h", 1, ("decode",))
        prefill = Endpoint("p", "h", 2, ("prefill",))
        discovery = StaticDiscovery({"pdmesh-worker": [decode, prefill]})
        got: list[frozenset[Endpoint]] = []
        watch = discovery.watch("pdmesh-worker", "decode", got.append)
        await asyncio.wait_for(watch.ready.wait(), 1)
        nothing = discovery.watch("pdmesh-router", None, got.append)
        await asyncio.wait_for(nothing.ready.wait(), 1)
        await discovery.register(ServiceRegistration("pdmesh-worker", "h", 3))  # no-op
        await discovery.close()
        assert got == [frozenset({decode}), frozenset()]
        assert watch.endpoints == {decode}

    asyncio.run(scenario())


def test_make_discovery_picks_the_backend() -> None:
    static = make_discovery(DiscoveryConfig(), static={"pdmesh-worker": "a:1,b:2"})
    assert isinstance(static, StaticDiscovery)

    async def first() -> frozenset[Endpoint]:
        got: list[frozenset[Endpoint]] = []
        watch = static.watch("pdmesh-worker", None, got.append)
        await watch.ready.wait()
        return got[0]

    assert {e.id for e in asyncio.run(first())} == {"a:1", "b:2"}
    consul = make_discovery(DiscoveryConfig("consul", "https://c:8501", "tok"))
    assert isinstance(consul, ConsulDiscovery)
    assert consul.api.base_url == "https://c:8501"


def test_diffing_calls_remove_then_add_and_survives_errors() -> None:
    calls: list[str] = []

    def add(e: Endpoint) -> None:
        if e.id == "bad":
            raise RuntimeError("duplicate address")
        calls.append(f"+{e.id}")

    async def remove(e: Endpoint) -> None:
        calls.append(f"-{e.id}")

    on_change = diffing(add, remove)
    a, b, bad = Endpoint("a", "h", 1), Endpoint("b", "h", 2), Endpoint("bad", "h", 3)
    a2 = Endpoint("a", "h", 1, meta={"model": "new"})

    async def scenario() -> None:
        await on_change(frozenset({a, bad}))
        await on_change(frozenset({a, b, bad}))  # bad is tried again: it never got in
        await on_change(frozenset({a2, b}))  # a changed meta: removed, then added
        await on_change(frozenset())

    asyncio.run(scenario())
    assert calls == ["+a", "+b", "-a", "+a", "-a", "-b"]


def test_endpoint_role_from_tags() -> None:
    assert Endpoint("a", "h", 1, ("canary", "decode")).role == "decode"
    assert Endpoint("a", "h", 1, ("prefill",)).role == "prefill"
    assert Endpoint("a", "h", 1, ("agg",)).role == "aggregated"
    assert Endpoint("a", "h", 1).role is None
