"""Router admission limits and Prometheus metrics, with real processes: a router that runs one
request at a time (``--max-concurrent-requests 1 --queue-size 1``) behind a real gateway, in
front of the session's tokenizer and worker.

While one long stream holds the slot, a second request waits in the queue and a third is
refused at once (HTTP 429, ``queue_full``); the queued one gives up after
``--queue-timeout-secs`` (HTTP 408, ``queue_timeout``). Cancelling the stream, and requests
that fail after admission, give the slot back. The router's ``/metrics`` (on
``--prometheus-port``) counts all of it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.integration.procs import ServiceProc, free_port, start_service
from tests.integration.test_gateway import MODEL, start_gateway
from tests.integration.test_gateway_errors import assert_openai_error

pytestmark = pytest.mark.model

QUEUE_TIMEOUT_S = 3.0  # long enough that the queued request is still waiting when we look
PAYLOAD_LIMIT = 4096
WAIT_S = 60.0  # event waits under CPU contention: polled, ending as soon as the state is there

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Mesh:
    router: ServiceProc
    gateway: str
    metrics_url: str
    worker: str

    @contextlib.contextmanager
    def stub(self) -> Iterator[router_pb2_grpc.RouterServiceStub]:
        with grpc.insecure_channel(self.router.address) as channel:
            yield router_pb2_grpc.RouterServiceStub(channel)


@pytest.fixture(scope="module")
def mesh(
    tokenizer_proc: ServiceProc, worker_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("router-limits")
    metrics_port = free_port()
    args = [
        "--workers", worker_proc.address, "--tokenizer", tokenizer_proc.address,
        "--policy", "cache_aware",
        "--max-concurrent-requests", "1", "--queue-size", "1",
        "--queue-timeout-secs", str(QUEUE_TIMEOUT_S),
        "--max-payload-size", str(PAYLOAD_LIMIT),
        "--prometheus-port", str(metrics_port),
        "--grace-period", "2",
    ]  # fmt: skip
    router = start_service("services.router", args, "limited-router", log_dir=log_dir)
    gateway = start_gateway(router.address, "--grace-period", "1", log_dir=log_dir)
    try:
        yield Mesh(
            router,
            f"http://{gateway.address}",
            f"http://127.0.0.1:{metrics_port}/metrics",
            worker_proc.address,
        )
    finally:
        gateway.stop_and_check()
        router.stop_and_check()


def scrape(url: str) -> Samples:
    text = httpx.get(url, timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def family_names(url: str) -> set[str]:
    return {f.name for f in text_string_to_metric_families(httpx.get(url, timeout=10).text)}


def wait_for(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"still not {what} after {WAIT_S:.0f}s"
        time.sleep(0.05)


def gauge(mesh: Mesh, name: str) -> float:
    return scrape(mesh.metrics_url)[(name, ())]


def completion(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 1, **overrides}


def test_queue_full_is_429_queue_timeout_is_408_and_slots_come_back(mesh: Mesh) -> None:
    url = f"{mesh.gateway}/v1/completions"
    long_stream = completion(max_tokens=1500, ignore_eos=True, stream=True)
    with (
        concurrent.futures.ThreadPoolExecutor(1) as pool,
        httpx.stream("POST", url, json=long_stream, timeout=WAIT_S) as holder,
    ):
        assert holder.status_code == 200
        lines = holder.iter_lines()
        next(line for line in lines if line.startswith("data:"))  # streaming: it has the slot
        assert gauge(mesh, "pdmesh_router_active_requests") == 1

        queued = pool.submit(httpx.post, url, json=completion(), timeout=WAIT_S)
        wait_for("queued", lambda: gauge(mesh, "pdmesh_router_queue_depth") == 1)

        refused = httpx.post(url, json=completion(), timeout=WAIT_S)
        error = assert_openai_error(refused, 429)
        assert (error["code"], error["type"]) == ("queue_full", "rate_limit_error")
        assert "--queue-size" in error["message"]

        timed_out = queued.result(timeout=WAIT_S)
        error = assert_openai_error(timed_out, 408)
        assert error["code"] == "queue_timeout"
        assert "queue" in error["message"] and "--queue-timeout-secs" in error["message"]
        assert gauge(mesh, "pdmesh_router_queue_depth") == 0
        # the stream still holds its slot and still streams
        assert any(line.startswith("data:") for line in (next(lines), next(lines)))
    # leaving the block closed the stream: the gateway cancels it down to the router
    wait_for("idle", lambda: gauge(mesh, "pdmesh_router_active_requests") == 0)
    ok = httpx.post(url, json=completion(), timeout=WAIT_S)
    assert ok.status_code == 200, ok.text

    got = scrape(mesh.metrics_url)
    assert got[("pdmesh_router_rejected_total", (("reason", "queue_full"),))] == 1
    assert got[("pdmesh_router_rejected_total", (("reason", "queue_timeout"),))] == 1
    assert got[("pdmesh_router_request_errors_total", (("code", "RESOURCE_EXHAUSTED"),))] == 1
    assert got[("pdmesh_router_request_errors_total", (("code", "DEADLINE_EXCEEDED"),))] == 1
    assert got[("pdmesh_router_cancellations_total", ())] == 1  # the stream, and only it
    assert got[("pdmesh_router_queue_wait_seconds_count", ())] >= 1
    assert got[("pdmesh_router_queue_wait_seconds_sum", ())] >= QUEUE_TIMEOUT_S


def test_failed_requests_give_their_slot_back(mesh: Mesh) -> None:
    with mesh.stub() as stub:
        # fails in the router after admission (InvalidRequestError), and on the worker
        # (an out-of-vocabulary id: the worker's INVALID_ARGUMENT through UpstreamError)
        bad_stop = router_pb2.RouterGenerateRequest(
            text="Hi", sampling_params=common_pb2.SamplingParams(stop=[""], max_new_tokens=1)
        )
        bad_ids = router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=[10**8]),
            sampling_params=common_pb2.SamplingParams(max_new_tokens=1),
        )
        for bad in (bad_stop, bad_ids, bad_stop, bad_ids):
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Generate(bad, timeout=WAIT_S))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # with one slot, a leaked one would make this wait in the queue and time out
        ok = router_pb2.RouterGenerateRequest(
            text="Hi", sampling_params=common_pb2.SamplingParams(max_new_tokens=1)
        )
        replies = list(stub.Generate(ok, timeout=WAIT_S))
        assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert gauge(mesh, "pdmesh_router_active_requests") == 0


def test_a_request_over_max_payload_size_is_resource_exhausted(mesh: Mesh) -> None:
    with mesh.stub() as stub:
        huge = router_pb2.RouterGenerateRequest(
            token_ids=router_pb2.TokenIds(ids=[100_000] * PAYLOAD_LIMIT)  # 3 bytes per id
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Generate(huge, timeout=WAIT_S))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        small = router_pb2.RouterGenerateRequest(
            text="Hi", sampling_params=common_pb2.SamplingParams(max_new_tokens=1)
        )
        assert list(stub.Generate(small, timeout=WAIT_S))[-1].finish_reason


def test_metrics_families_are_present_and_counting(mesh: Mesh) -> None:
    with mesh.stub() as stub:
        for _ in range(2):  # the same prompt twice: the second follows the first's cache
            request = router_pb2.RouterGenerateRequest(
                text="The same prompt, twice over",
                sampling_params=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
            )
            assert len(list(stub.Generate(request, timeout=WAIT_S))) >= 2
    got = scrape(mesh.metrics_url)
    worker = (("role", "aggregated"), ("worker", mesh.worker))
    policy = (("policy", "cache_aware"),)
    assert got[("pdmesh_router_requests_total", (("mode", "aggregated"),))] >= 2
    assert got[("pdmesh_router_routing_decisions_total", (*policy, ("worker", mesh.worker)))] >= 2
    assert got[("pdmesh_router_cache_prompt_tokens_total", policy)] > 0
    assert got[("pdmesh_router_cache_matched_tokens_total", policy)] > 0
    assert got[("pdmesh_router_cache_match_ratio_count", policy)] >= 2
    assert got[("pdmesh_router_overhead_seconds_count", ())] >= 2
    assert got[("pdmesh_time_to_first_token_seconds_count", ())] >= 2
    assert got[("pdmesh_inter_token_latency_seconds_count", ())] >= 3
    assert got[("pdmesh_router_worker_in_flight", worker)] == 0
    assert got[("pdmesh_router_worker_circuit_state", worker)] == 0
    assert got[("pdmesh_router_worker_healthy", worker)] == 1
    assert got[("pdmesh_router_queue_depth", ())] == 0
    assert got[("pdmesh_router_retries_total", ())] == 0
    # families without a sample yet are still declared
    names = family_names(mesh.metrics_url)
    assert {"pdmesh_router_migrations", "pdmesh_router_rejected"} <= names
    # --prometheus-port is the router's one /metrics server
    assert mesh.router.log.count("Prometheus metrics on") == 1


def test_the_router_log_has_no_tracebacks(mesh: Mesh) -> None:
    assert "Traceback" not in mesh.router.log
