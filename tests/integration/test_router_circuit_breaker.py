"""Circuit breaking with real processes: two workers behind a round-robin router; worker A is
frozen (SIGSTOP), so the requests routed to it run into the router's deadline. After
``--cb-failure-threshold`` of those its circuit opens and every request goes to B while A is
down; after A is thawed and ``--cb-timeout-duration-secs`` has passed, half-open probes close
the circuit and A takes its turns again. Client errors routed to A never count.

The state is read two ways: from the router's ``pdmesh_router_worker_circuit_state`` gauge,
and from the routing itself: round-robin over two workers alternates, and only an open circuit
skips a worker that is still marked healthy. Health checks are slowed to one an hour so that the
breaker is the only thing that can take A out (a health check of a frozen worker would mark it
unhealthy on its own).
"""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pdmesh.rpc import keepalive
from pdmesh.rpc.errors import error_detail
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2_grpc
from tests.integration.procs import ServiceProc, free_port, start_service, worker_args
from tests.integration.test_router_migration import request, router, tokens_of
from tests.integration.test_router_service import wait_until_idle

pytestmark = pytest.mark.model

THRESHOLD = 2  # --cb-failure-threshold
SUCCESSES = 2  # --cb-success-threshold
CB_TIMEOUT_S = 5.0  # --cb-timeout-duration-secs
# the router's deadline: how long a request routed to frozen A takes. Shorter than the ping
# timeout with which the router's keepalive finds a frozen worker itself (UNAVAILABLE, which
# would also mark A unhealthy and retry on B): here only the breaker may take A out
REQUEST_TIMEOUT_S = 0.9 * keepalive.PING_TIMEOUT_S
RECOVERY_S = 60.0  # deadline for A to take traffic again once the breaker's timeout is over
ROUTER_FLAGS = [
    "--health-check-interval", "3600",
    "--request-timeout-secs", str(REQUEST_TIMEOUT_S),
    "--cb-failure-threshold", str(THRESHOLD),
    "--cb-success-threshold", str(SUCCESSES),
    "--cb-timeout-duration-secs", str(CB_TIMEOUT_S),
]  # fmt: skip
# a token id past the vocabulary: the worker refuses the request with INVALID_ARGUMENT
OUT_OF_VOCAB = router_pb2.RouterGenerateRequest(
    token_ids=router_pb2.TokenIds(ids=[5, 10**6]),
    sampling_params=common_pb2.SamplingParams(max_new_tokens=2),
)


CIRCUIT_STATE = "pdmesh_router_worker_circuit_state"
CLOSED, OPEN, HALF_OPEN = 0, 1, 2  # its values


def circuit_states(metrics_port: int) -> dict[str, float]:
    """Each worker's circuit state (by worker id) as the router's /metrics reports it."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        sample.labels["worker"]: sample.value
        for family in text_string_to_metric_families(text)
        if family.name == CIRCUIT_STATE
        for sample in family.samples
    }


def served_by(stub: router_pb2_grpc.RouterServiceStub) -> str:
    """The worker id that served one short greedy request (which must succeed)."""
    replies = list(stub.Generate(request(max_new_tokens=2), timeout=30))
    assert len(tokens_of(replies)) == 2
    return replies[-1].worker_id


def outcome(call: Callable[[], str]) -> str | grpc.RpcError:
    try:
        return call()
    except grpc.RpcError as e:
        return e


def test_a_failing_worker_is_cut_off_and_taken_back(
    tmp_path: Path, tokenizer_proc: ServiceProc, worker_proc: ServiceProc
) -> None:
    metrics_port = free_port()
    flags = [*ROUTER_FLAGS, "--metrics-port", str(metrics_port)]
    with (
        start_service("services.decode", worker_args(), "worker-a", log_dir=tmp_path) as frozen,
        router(tmp_path, tokenizer_proc, [frozen, worker_proc], *flags) as stub,
        ThreadPoolExecutor(max_workers=2 * THRESHOLD) as pool,
    ):
        # A: a worker of its own, to freeze; B: the session's
        a, b = frozen.address, worker_proc.address  # worker ids default to their addresses
        try:
            check_client_errors_do_not_count(stub, a, b)
            assert circuit_states(metrics_port) == {a: CLOSED, b: CLOSED}

            # 1. A freezes: the requests round-robin gives it fail at the router's deadline
            os.kill(frozen.pid, signal.SIGSTOP)
            sent_at = time.monotonic()
            batch = [pool.submit(outcome, lambda: served_by(stub)) for _ in range(2 * THRESHOLD)]
            results = [f.result() for f in batch]
            failures = [r for r in results if isinstance(r, grpc.RpcError)]
            assert [r for r in results if not isinstance(r, grpc.RpcError)] == [b] * THRESHOLD
            assert len(failures) == THRESHOLD
            for e in failures:
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
                assert a in (e.details() or "")
            # (the state turns half-open when read after the timeout: read before it)
            half_open_at = sent_at + REQUEST_TIMEOUT_S + CB_TIMEOUT_S
            states = circuit_states(metrics_port)
            if time.monotonic() < half_open_at:
                assert states == {a: OPEN, b: CLOSED}

            # 2. its circuit is open: everything goes to B, none to frozen A (where it would
            # hang). Only requests done before the circuit can possibly half-open are asked:
            # it opened at the router's deadline of the batch at the earliest
            shifted: list[str] = []
            while len(shifted) < 4 and time.monotonic() + 1.0 < half_open_at:
                shifted.append(served_by(stub))
            assert len(shifted) >= 2, "too slow to see the open circuit; raise CB_TIMEOUT_S"
            assert set(shifted) == {b}

            # 3. A thaws; it still gets nothing until the breaker's timeout is over, then a
            # probe reaches it
            os.kill(frozen.pid, signal.SIGCONT)
            deadline = half_open_at + RECOVERY_S
            while served_by(stub) != a:
                assert time.monotonic() < deadline, "A never took traffic again"
                time.sleep(0.1)
            assert time.monotonic() >= half_open_at
            assert circuit_states(metrics_port)[a] == HALF_OPEN  # one probe of SUCCESSES

            # 4. the probes succeed and close the circuit: A takes every other request again
            used = [served_by(stub) for _ in range(2 * SUCCESSES)]
            assert sorted(used) == sorted([a, b] * SUCCESSES), used
            assert all(x != y for x, y in zip(used, used[1:])), used
            assert circuit_states(metrics_port) == {a: CLOSED, b: CLOSED}
        finally:
            os.kill(frozen.pid, signal.SIGCONT)  # never leave a frozen process behind
        # the requests that timed out while A was frozen left nothing behind there
        with grpc.insecure_channel(a) as channel:
            wait_until_idle(worker_pb2_grpc.WorkerServiceStub(channel), within=1.0)


def check_client_errors_do_not_count(
    stub: router_pb2_grpc.RouterServiceStub, a: str, b: str
) -> None:
    """More than THRESHOLD requests with out-of-vocabulary token ids go to A, each refused
    with INVALID_ARGUMENT, and A's circuit stays closed."""
    for _ in range(2):  # line round-robin up: the next request goes to A
        if served_by(stub) == b:
            break
    for _ in range(THRESHOLD + 1):
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(OUT_OF_VOCAB, timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        detail = error_detail(info.value)
        assert detail is not None and detail.field == "token_ids"
        # B got the next turn, so the refused request took A's: it reached A
        assert served_by(stub) == b
    assert served_by(stub) == a  # still closed: the refusals were not charged to A
