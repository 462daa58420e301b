"""A ``--tp-size 3`` worker (the default model's 9 heads and 3 KV heads over 3 CPU ranks, gloo)
in the whole mesh: through the gateway with the official ``openai`` client its greedy answers
equal the session's TP 1 worker's; ``kill -9`` of a non-zero rank while requests stream takes
the worker out of the mesh at once and the router migrates its requests to the other worker,
where they complete with the fault-free output."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.integration.procs import ServiceProc, free_port, start_service, worker_args
from tests.integration.test_gateway import MODEL, start_gateway

pytestmark = pytest.mark.model

TP_ARGS = ("--tp-size", "3", "--dtype", "float32")
QUESTIONS = ["Say hello in one short sentence.", "What is 2 + 2?", "Name a colour."]
MAX_TOKENS = 32
HEALTH_INTERVAL_S = 0.5
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def tp_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProc]:
    log_dir = tmp_path_factory.mktemp("tp-worker")
    args = worker_args(*TP_ARGS, "--migration-limit", "3")
    svc = ServiceProc("services.decode", args, "tp-worker", free_port(), log_dir)
    try:
        svc.wait_until_serving()
        yield svc
    finally:
        svc.stop()


def _router(tmp_path: Path, tokenizer: ServiceProc, *workers: ServiceProc) -> ServiceProc:
    args = ["--workers", ",".join(w.address for w in workers), "--tokenizer", tokenizer.address]
    args += ["--health-check-interval", str(HEALTH_INTERVAL_S), "--grace-period", "2"]
    return start_service("services.router", args, "router-tp", log_dir=tmp_path)


def _answers(base_url: str) -> list[str]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as client:
        return [
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": q}],
                temperature=0,
                max_tokens=MAX_TOKENS,
            )
            .choices[0]
            .message.content
            or ""
            for q in QUESTIONS
        ]


def test_tp3_worker_answers_as_the_tp1_worker(
    tmp_path: Path,
    tp_worker: ServiceProc,
    router_proc: ServiceProc,
    tokenizer_proc: ServiceProc,
) -> None:
    with _router(tmp_path, tokenizer_proc, tp_worker) as router:
        tp_gateway = start_gateway(router.address, log_dir=tmp_path, name="gateway-tp3")
        tp1_gateway = start_gateway(router_proc.address, log_dir=tmp_path, name="gateway-tp1")
        try:
            got = _answers(f"http://{tp_gateway.address}")
            want = _answers(f"http://{tp1_gateway.address}")
        finally:
            tp_gateway.stop()
            tp1_gateway.stop()
    assert all(got) and got == want


def _rank_pids(worker: ServiceProc) -> list[int]:
    """The worker's engine ranks, rank 0 first, from its log line."""
    match = re.search(
        r"engine process (\d+) ready \(rank 0 of 3; ranks \[(\d+), (\d+)\]\)", worker.log
    )
    assert match, worker.log[-2000:]
    return [int(g) for g in match.groups()]


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=0.5
            )
    except grpc.RpcError:
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_a_killed_rank_takes_the_worker_out_and_its_requests_migrate(
    tmp_path: Path, tp_worker: ServiceProc, worker_proc: ServiceProc, tokenizer_proc: ServiceProc
) -> None:
    # runs last: it kills the module's TP worker. The requests migrate to the session's worker
    params = common_pb2.SamplingParams(temperature=0.0, max_new_tokens=48, ignore_eos=True)
    request = router_pb2.RouterGenerateRequest(text="Once upon a time", sampling_params=params)
    with (
        _router(tmp_path, tokenizer_proc, tp_worker) as router,
        grpc.insecure_channel(router.address) as channel,
    ):
        stub = router_pb2_grpc.RouterServiceStub(channel)
        expected = [t for r in stub.Generate(request, timeout=DEADLINE_S) for t in r.token_ids]
        results: list[list[int] | BaseException] = []
        started = threading.Barrier(5)

        def stream() -> None:
            tokens: list[int] = []
            try:
                for i, r in enumerate(stub.Generate(request, timeout=DEADLINE_S)):
                    tokens += r.token_ids
                    if i == 0:
                        started.wait(timeout=DEADLINE_S)
                results.append(tokens)
            except BaseException as e:  # noqa: BLE001 (asserted below)
                results.append(e)

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        started.wait(timeout=DEADLINE_S)  # every stream has tokens from the TP worker
        # a worker for the streams to migrate to, added once they all run on the TP worker
        # (AddWorker answers after its first health check)
        added = stub.AddWorker(router_pb2.AddWorkerRequest(address=worker_proc.address), timeout=30)
        assert added.worker.address == worker_proc.address
        killed = time.monotonic()
        os.kill(_rank_pids(tp_worker)[2], signal.SIGKILL)
        while _serving(tp_worker.address) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        left = time.monotonic() - killed
        for t in threads:
            t.join(timeout=DEADLINE_S)
    assert left <= HEALTH_INTERVAL_S + 2, f"still SERVING {left:.1f}s after the kill"
    assert results == [expected] * 4
    assert "tp rank 2 exited" in tp_worker.log
