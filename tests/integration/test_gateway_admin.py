"""The gateway's SGLang-router admin routes (``/add_worker``, ``/remove_worker``, ``/workers``)
against a real router and real workers, and its ``--request-id-headers`` and
``--cors-allowed-origins`` flags: each service a real process on a loopback port.

A worker removed while a request streams from it finishes that request (the router closes its
channel only after the drain timeout); new requests no longer go there."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.integration.procs import ServiceProc, start_service, worker_args
from tests.integration.test_gateway import MODEL, start_gateway
from tests.integration.test_gateway_errors import assert_openai_error

pytestmark = pytest.mark.model

API_KEY = "sk-test-admin"
AUTH = {"authorization": f"Bearer {API_KEY}"}
ORIGIN = "http://app.example"
ID_HEADERS = "x-my-id,x-request-id"
TOKENS = 24  # of the request that outlives its worker's removal
TIMEOUT_S = 60.0


@dataclass
class Mesh:
    router: ServiceProc
    gateway: str  # --api-key, --request-id-headers, --cors-allowed-origins
    plain: str  # every flag at its default
    worker: ServiceProc


@pytest.fixture(scope="module")
def mesh(
    tokenizer_proc: ServiceProc, worker_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("gateway-admin")
    args = ["--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address]
    router = start_service(
        "services.router", [*args, "--grace-period", "2"], "admin-router", log_dir=log_dir
    )
    flags = [
        "--api-key", API_KEY, "--request-id-headers", ID_HEADERS,
        "--cors-allowed-origins", f"{ORIGIN},http://other.example", "--grace-period", "1",
    ]  # fmt: skip
    gateway = start_gateway(router.address, *flags, log_dir=log_dir, name="admin-gateway")
    plain = start_gateway(router.address, "--grace-period", "1", log_dir=log_dir, name="plain")
    try:
        yield Mesh(router, f"http://{gateway.address}", f"http://{plain.address}", worker_proc)
    finally:
        plain.stop_and_check()
        gateway.stop_and_check()
        router.stop_and_check()


def post(mesh: Mesh, path: str, **params: str) -> httpx.Response:
    return httpx.post(f"{mesh.gateway}{path}", params=params, headers=AUTH, timeout=TIMEOUT_S)


def listed(mesh: Mesh) -> dict[str, dict[str, object]]:
    reply = httpx.get(f"{mesh.gateway}/workers", headers=AUTH, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["total"] == len(body["workers"])
    return {w["url"]: w for w in body["workers"]}


def wait_until_idle(address: str, within: float = 10.0) -> None:
    """Until the worker at ``address`` runs no request (polled, with a deadline)."""
    deadline = time.monotonic() + within
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerServiceStub(channel)
        while stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=5).num_running:
            assert time.monotonic() < deadline, f"{address} still runs a request"
            time.sleep(0.05)


def test_add_and_remove_a_worker_over_http_while_it_serves(
    mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_dir = tmp_path_factory.mktemp("admin-worker")
    with start_service("services.decode", worker_args(), "worker-2", log_dir=log_dir) as extra:
        # the key is needed
        denied = httpx.post(f"{mesh.gateway}/add_worker", params={"url": extra.address})
        assert_openai_error(denied, 401)
        assert extra.address not in listed(mesh)

        added = post(mesh, "/add_worker", url=f"grpc://{extra.address}")
        assert added.status_code == 200, added.text
        worker = added.json()["worker"]
        assert (worker["url"], worker["role"], worker["healthy"]) == (
            extra.address,
            "aggregated",
            True,
        )
        assert worker["model"] == MODEL
        assert set(listed(mesh)) == {mesh.worker.address, extra.address}
        again = assert_openai_error(post(mesh, "/add_worker", url=extra.address), 400)
        assert "already registered" in again["message"]

        with grpc.insecure_channel(mesh.router.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            stream, first = stream_on(stub, extra.address)
            removed = post(mesh, "/remove_worker", url=extra.address)
            assert removed.status_code == 200, removed.text
            assert set(listed(mesh)) == {mesh.worker.address}
            # the request that was on it runs to its end there
            rest = list(stream)
            replies = [first, *rest]
            assert {r.worker_id for r in replies} == {extra.address}
            assert sum(len(r.token_ids) for r in replies) == TOKENS
            assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            wait_until_idle(extra.address)  # and freed it there
            # and new ones go elsewhere
            for _ in range(2):
                ids = {r.worker_id for r in stub.Generate(request(1), timeout=TIMEOUT_S)}
                assert ids == {mesh.worker.address}

        gone = assert_openai_error(post(mesh, "/remove_worker", url=extra.address), 404, "url")
        assert gone["code"] == "worker_not_found"


def request(max_new_tokens: int) -> router_pb2.RouterGenerateRequest:
    params = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    return router_pb2.RouterGenerateRequest(text="Once upon a time", sampling_params=params)


def stream_on(
    stub: router_pb2_grpc.RouterServiceStub, address: str
) -> tuple[Iterator[router_pb2.RouterGenerateResponse], router_pb2.RouterGenerateResponse]:
    """A streaming request served by the worker at ``address``, and its first message (the
    router routes round-robin, so a few tries reach every worker)."""
    for _ in range(4):
        call = stub.Generate(request(TOKENS), timeout=TIMEOUT_S)
        first = next(call)
        if first.worker_id == address:
            return call, first
        call.cancel()
    raise AssertionError(f"no request reached {address}")


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"url": "http://127.0.0.1:1"}, "url"),
        ({"url": "no-port"}, "url"),
        ({}, "url"),
        ({"url": "127.0.0.1:1", "role": "router"}, "role"),
    ],
    ids=["http scheme", "no port", "no url", "bad role"],
)
def test_bad_admin_requests_are_400(mesh: Mesh, params: dict[str, str], param: str) -> None:
    assert_openai_error(post(mesh, "/add_worker", **params), 400, param)


def test_the_request_id_comes_from_the_configured_headers(mesh: Mesh) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
    url = f"{mesh.gateway}/v1/completions"
    # the first of --request-id-headers present wins
    both = {**AUTH, "x-request-id": "second-choice", "x-my-id": "first-choice"}
    reply = httpx.post(url, json=body, headers=both, timeout=TIMEOUT_S)
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-request-id"] == "first-choice"
    assert reply.json()["id"] == "cmpl-first-choice"
    # a header off the list is not read: a new id
    other = {**AUTH, "x-correlation-id": "not-listed"}
    fresh = httpx.post(url, json=body, headers=other, timeout=TIMEOUT_S)
    assert fresh.status_code == 200, fresh.text
    new_id = fresh.headers["x-request-id"]
    assert new_id != "not-listed" and len(new_id) == 32
    # the default list (SGLang's) includes x-correlation-id
    plain = httpx.post(
        f"{mesh.plain}/v1/completions",
        json=body,
        headers={"x-correlation-id": "corr-7"},
        timeout=TIMEOUT_S,
    )
    assert plain.headers["x-request-id"] == "corr-7"
    assert plain.json()["id"] == "cmpl-corr-7"


def preflight(base: str, origin: str) -> httpx.Response:
    headers = {
        "origin": origin,
        "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type",
    }
    return httpx.options(f"{base}/v1/chat/completions", headers=headers, timeout=TIMEOUT_S)


def test_cors_preflight_and_responses(mesh: Mesh) -> None:
    # a browser's preflight carries no API key, and is answered anyway
    ok = preflight(mesh.gateway, ORIGIN)
    assert ok.status_code == 200, ok.text
    assert ok.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    refused = preflight(mesh.gateway, "http://evil.example")
    assert refused.status_code == 400
    assert "access-control-allow-origin" not in refused.headers
    # actual responses, errors included, carry the headers a browser needs to read them
    listed = httpx.get(f"{mesh.gateway}/v1/models", headers={**AUTH, "origin": ORIGIN})
    assert listed.status_code == 200
    assert listed.headers["access-control-allow-origin"] == ORIGIN
    assert "x-request-id" in listed.headers["access-control-expose-headers"].lower()
    denied = httpx.get(f"{mesh.gateway}/workers", headers={"origin": ORIGIN})
    assert_openai_error(denied, 401)
    assert denied.headers["access-control-allow-origin"] == ORIGIN
    # without --cors-allowed-origins there is no CORS at all
    plain = preflight(mesh.plain, ORIGIN)
    assert "access-control-allow-origin" not in plain.headers
    simple = httpx.get(f"{mesh.plain}/v1/models", headers={"origin": ORIGIN})
    assert "access-control-allow-origin" not in simple.headers
