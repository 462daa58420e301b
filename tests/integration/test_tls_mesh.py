"""A PD mesh whose every gRPC hop runs mutual TLS, with certificates made in the test.

tokenizer + prefill + decode (grpc KV backend) + router + gateway, each a real process started
with ``--tls-cert/--tls-key/--tls-ca``: gateway → router, router → tokenizer / prefill /
decode (and their health checks), decode → the prefill's bootstrap server, prefill → the
decode's KV receiver. Clients without the mesh's CA, or without a client certificate, are
refused; a gateway that cannot verify the router answers 503 saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.certs import Pki, make_pki
from tests.integration.procs import ServiceProc, free_port, wait_all_serving, worker_args
from tests.integration.test_gateway import GREETING, MODEL, start_gateway
from tests.integration.test_pd import Worker, wait_idle

pytestmark = pytest.mark.model


@dataclass
class TlsMesh:
    pki: Pki
    rogue: Pki  # a CA the mesh does not trust, with its own certificates
    prefill: Worker
    decode: Worker
    router: ServiceProc
    gateway: str  # base URL


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsMesh]:
    certs = tmp_path_factory.mktemp("pki")
    pki, rogue = make_pki(certs / "mesh"), make_pki(certs / "rogue", "rogue")
    tls, flags = pki.tls_config(), pki.server_flags()
    log_dir = tmp_path_factory.mktemp("tls-mesh")
    kv = ("--kv-transfer-backend", "grpc", "--num-pages", "64")

    def proc(module: str, args: list[str], name: str) -> ServiceProc:
        return ServiceProc(module, [*args, *flags], name, free_port(), log_dir, tls)

    workers = [
        proc("services.tokenizer", ["--grace-period", "2"], "tokenizer"),
        proc("services.prefill", worker_args("--bootstrap-port", "0", *kv), "prefill"),
        proc("services.decode", worker_args("--mode", "decode", *kv), "decode"),
    ]
    wait_all_serving(workers)
    tokenizer, prefill, decode = workers
    routing = [
        "--prefill-workers", prefill.address, "--decode-workers", decode.address,
        "--tokenizer", tokenizer.address, "--grace-period", "2",
        "--health-check-interval", "1",
    ]  # fmt: skip
    router = proc("services.router", routing, "router")
    wait_all_serving([router])
    gateway = start_gateway(router.address, *flags, log_dir=log_dir)
    channels = [tls.sync_channel(w.address) for w in (prefill, decode)]
    stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in channels]
    yield TlsMesh(
        pki,
        rogue,
        Worker(prefill, channels[0], stubs[0]),
        Worker(decode, channels[1], stubs[1]),
        router,
        f"http://{gateway.address}",
    )
    for c in channels:
        c.close()
    for p in (gateway, router, *workers):
        p.stop_and_check()


def chat(base_url: str, timeout: float = 120) -> httpx.Response:
    body = {"model": MODEL, "messages": GREETING, "max_tokens": 4, "temperature": 0}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=timeout)


def health(address: str, tls: TLSConfig) -> int:
    with tls.sync_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


def refusal(address: str, tls: TLSConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        health(address, tls)
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    return error


def test_a_request_crosses_every_hop_over_mutual_tls(mesh: TlsMesh) -> None:
    rooms_before = mesh.decode.load().total_rooms
    response = chat(mesh.gateway)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"]
    assert body["usage"]["completion_tokens"] > 0
    # prefilled on the prefill worker, its KV sent over TLS into the decode's receiver
    assert mesh.decode.load().total_rooms == rooms_before + 1
    # streamed through the router's gRPC API with the test's own client certificate
    with mesh.pki.tls_config().sync_channel(mesh.router.address) as channel:
        request = router_pb2.RouterGenerateRequest(
            text="The capital of France is",
            sampling_params=common_pb2.SamplingParams(max_new_tokens=3, temperature=0),
        )
        replies = list(router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=120))
    assert [t for r in replies for t in r.token_ids]
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    for worker in (mesh.prefill, mesh.decode):
        wait_idle(worker, within=5.0)
    # the bootstrap server decodes register with is on TLS too
    info = mesh.prefill.stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=5)
    bootstrap = f"127.0.0.1:{info.bootstrap_port}"
    assert health(bootstrap, mesh.pki.tls_config()) == health_pb2.HealthCheckResponse.SERVING
    refusal(bootstrap, TLSConfig(tls_ca=str(mesh.pki.ca)))


def test_clients_without_the_mesh_ca_are_refused_naming_tls(mesh: TlsMesh) -> None:
    for address in (mesh.router.address, mesh.decode.proc.address):
        # the mesh's certificate is not one this client trusts
        error = refusal(address, mesh.rogue.tls_config())
        assert "handshake" in error.details().lower(), error.details()
        assert "CERTIFICATE_VERIFY_FAILED" in error.details()
        # a client with a certificate but no CA verifies against the system's roots
        no_ca = TLSConfig(tls_cert=str(mesh.pki.client_cert), tls_key=str(mesh.pki.client_key))
        assert "CERTIFICATE_VERIFY_FAILED" in refusal(address, no_ca).details()
        # a plaintext client cannot speak to a TLS port at all
        refusal(address, PLAINTEXT)


def test_mutual_tls_refuses_a_client_without_a_certificate(mesh: TlsMesh) -> None:
    address = mesh.router.address
    refusal(address, TLSConfig(tls_ca=str(mesh.pki.ca)))
    # nor one whose certificate another CA signed
    rogue_cert = TLSConfig(
        tls_cert=str(mesh.rogue.client_cert),
        tls_key=str(mesh.rogue.client_key),
        tls_ca=str(mesh.pki.ca),
    )
    refusal(address, rogue_cert)
    assert health(address, mesh.pki.tls_config()) == health_pb2.HealthCheckResponse.SERVING


def test_a_gateway_that_cannot_verify_the_router_says_so(mesh: TlsMesh, tmp_path: Path) -> None:
    gateway = start_gateway(mesh.router.address, *mesh.rogue.server_flags(), log_dir=tmp_path)
    try:
        base = f"http://{gateway.address}"
        assert httpx.get(f"{base}/health", timeout=30).status_code == 503
        response = chat(base, timeout=60)
        assert response.status_code == 503, response.text
        message = response.json()["error"]["message"]
        assert "handshake" in message.lower() and "CERTIFICATE_VERIFY_FAILED" in message
    finally:
        gateway.stop_and_check()
    # the mesh itself is unaffected
    assert chat(mesh.gateway).status_code == 200
