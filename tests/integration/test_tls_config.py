"""``TLSConfig``: its checks at startup, its flags and environment variables, and what real
in-process gRPC servers and channels made with it accept and refuse."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.config import add_dataclass_args, from_args
from pdmesh.discovery import ServiceRegistration
from pdmesh.discovery.consul import service_definition
from pdmesh.rpc.server import RpcServer
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from services import launch
from tests.certs import Pki, make_pki

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("rogue"), "rogue")


def server_tls(pki: Pki, client_auth: bool = True) -> TLSConfig:
    return TLSConfig(str(pki.cert), str(pki.key), str(pki.ca), tls_client_auth=client_auth)


def check(server: TLSConfig, client: TLSConfig) -> str:
    """Start an RpcServer with ``server``, call its health check through ``client``: "SERVING"
    or the failure's status code and details."""

    async def scenario() -> str:
        rpc = RpcServer(["pdmesh.test.Dummy"], tls=server)
        port = await rpc.start("127.0.0.1", 0)
        try:
            async with client.channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            return "SERVING" if reply.status == SERVING else str(reply.status)
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
        finally:
            await rpc.stop(0)

    return asyncio.run(scenario())


def test_modes(pki: Pki) -> None:
    assert (PLAINTEXT.mode, PLAINTEXT.dials_tls, PLAINTEXT.serves_tls) == (
        "plaintext",
        False,
        False,
    )
    assert server_tls(pki).mode == "mTLS"
    assert server_tls(pki, client_auth=False).mode == "TLS"
    only_ca = TLSConfig(tls_ca=str(pki.ca))
    assert (only_ca.dials_tls, only_ca.serves_tls, only_ca.mode) == (True, False, "plaintext")


def test_mutual_tls(pki: Pki, rogue: Pki) -> None:
    server = server_tls(pki)
    assert check(server, pki.tls_config()) == "SERVING"
    # the services' own certificate is a client certificate too
    assert check(server, server) == "SERVING"
    assert check(server, TLSConfig(tls_ca=str(pki.ca))).startswith("UNAVAILABLE")
    assert check(server, PLAINTEXT).startswith("UNAVAILABLE")
    distrusted = check(server, rogue.tls_config())
    assert distrusted.startswith("UNAVAILABLE") and "CERTIFICATE_VERIFY_FAILED" in distrusted
    foreign_cert = TLSConfig(str(rogue.client_cert), str(rogue.client_key), str(pki.ca))
    assert check(server, foreign_cert).startswith("UNAVAILABLE")


def test_tls_without_client_auth_takes_any_verifying_client(pki: Pki) -> None:
    server = server_tls(pki, client_auth=False)
    assert check(server, TLSConfig(tls_ca=str(pki.ca))) == "SERVING"
    assert check(server, pki.tls_config()) == "SERVING"
    assert check(server, PLAINTEXT).startswith("UNAVAILABLE")


def test_server_name_override(pki: Pki) -> None:
    server = server_tls(pki)
    client = pki.tls_config()
    # the certificate names 127.0.0.1 and localhost; dialed by IP, checked against a name
    named = TLSConfig(client.tls_cert, client.tls_key, client.tls_ca, tls_server_name="localhost")
    assert check(server, named) == "SERVING"
    wrong = TLSConfig(
        client.tls_cert, client.tls_key, client.tls_ca, tls_server_name="other.example"
    )
    assert check(server, wrong).startswith("UNAVAILABLE")


def test_plaintext_both_ways() -> None:
    assert check(PLAINTEXT, PLAINTEXT) == "SERVING"


def test_bad_files_fail_at_startup_naming_the_flag(pki: Pki, rogue: Pki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        TLSConfig(tls_cert=str(pki.cert))
    with pytest.raises(ValueError, match="--tls-key go together"):
        TLSConfig(tls_key=str(pki.key))
    with pytest.raises(ValueError, match="--tls-ca=/nonexistent/ca.pem: No such file"):
        TLSConfig(tls_ca="/nonexistent/ca.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="--tls-ca=.*junk.pem: not a PEM file"):
        TLSConfig(tls_ca=str(junk))
    with pytest.raises(ValueError, match="matching private key"):
        TLSConfig(str(pki.cert), str(rogue.key))
    # a key where the CA should be parses as PEM but holds no certificate
    with pytest.raises(ValueError, match="--tls-ca=.*no PEM CA certificate"):
        TLSConfig(tls_ca=str(pki.key))


def test_flags_environment_and_round_trip(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    def parse(argv: list[str]) -> TLSConfig:
        parser = argparse.ArgumentParser()
        add_dataclass_args(parser, TLSConfig)
        return from_args(TLSConfig, parser.parse_args(argv))

    for name in ("PDMESH_TLS_CERT", "PDMESH_TLS_KEY", "PDMESH_TLS_CA", "PDMESH_TLS_SERVER_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert parse([]) == PLAINTEXT
    given = server_tls(pki, client_auth=False)
    assert parse(given.flags()) == given
    assert "--no-tls-client-auth" in given.flags()
    monkeypatch.setenv("PDMESH_TLS_CERT", str(pki.cert))
    monkeypatch.setenv("PDMESH_TLS_KEY", str(pki.key))
    monkeypatch.setenv("PDMESH_TLS_CA", str(pki.ca))
    assert parse([]) == server_tls(pki)
    # a flag beats the environment
    assert parse(["--tls-ca", str(pki.cert)]).tls_ca == str(pki.cert)


def test_consul_checks_a_tls_server_over_tls() -> None:
    plain = service_definition(ServiceRegistration("x", "10.0.0.1", 5), 2.0, 90.0)["Check"]
    assert plain["GRPCUseTLS"] is False and "TLSSkipVerify" not in plain
    tls = ServiceRegistration("x", "10.0.0.1", 5, grpc_tls=True)
    check_def = service_definition(tls, 2.0, 90.0)["Check"]
    assert check_def["GRPC"] == "10.0.0.1:5"
    assert check_def["GRPCUseTLS"] is True and check_def["TLSSkipVerify"] is True


def test_the_launcher_hands_tls_to_every_service_and_probes_with_it(pki: Pki) -> None:
    tls = server_tls(pki)
    stages = launch.plan(launch.LauncherConfig(mode="disagg"), [], tls)
    services = [service for stage in stages for service in stage]
    assert len(services) == 5
    for name, _, args, _ in services:
        joined = " ".join(args)
        assert f"--tls-cert {pki.cert} --tls-key {pki.key} --tls-ca {pki.ca}" in joined, name

    async def probe() -> tuple[bool, bool]:
        rpc = RpcServer(["pdmesh.test.Dummy"], tls=tls)
        port = await rpc.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        try:
            target = f"grpc://127.0.0.1:{port}"
            # the blocking probe runs off the loop that serves
            with_tls = await loop.run_in_executor(None, launch.is_healthy, target, tls)
            plain = await loop.run_in_executor(None, launch.is_healthy, target, PLAINTEXT)
            return with_tls, plain
        finally:
            await rpc.stop(0)

    assert asyncio.run(probe()) == (True, False)
