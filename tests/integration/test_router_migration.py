"""Migration and circuit breaking with real processes: two workers behind a router, one of them
``kill -9``-ed while it streams a request. With ``--migration-limit 3`` the router moves the
request to the other worker and the client's output equals a fault-free greedy run; with
``--migration-limit 0`` the client gets a clear UNAVAILABLE within its deadline."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.integration.procs import ServiceProc, free_port, start_service, worker_args

pytestmark = pytest.mark.model

PROMPT = "Once upon a time"
MAX_TOKENS = 48
KILL_AFTER = 8  # tokens the client has before the worker serving it is killed
DEADLINE_S = 60.0


@contextmanager
def workers(tmp_path: Path, *extra: str) -> Iterator[list[ServiceProc]]:
    """Two workers with ``extra`` flags, started side by side (one model load's time)."""
    procs = [
        ServiceProc("services.decode", worker_args(*extra), f"worker-{i}", free_port(), tmp_path)
        for i in range(2)
    ]
    try:
        for p in procs:
            p.wait_until_serving()
        yield procs
    finally:
        for p in procs:
            p.stop()


@contextmanager
def router(
    tmp_path: Path, tokenizer: ServiceProc, procs: list[ServiceProc], *extra: str
) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    args = ["--workers", ",".join(p.address for p in procs), "--tokenizer", tokenizer.address]
    args += ["--health-check-interval", "0.5", "--grace-period", "2", *extra]
    with (
        start_service("services.router", args, "router", log_dir=tmp_path) as svc,
        grpc.insecure_channel(svc.address) as channel,
    ):
        stub = router_pb2_grpc.RouterServiceStub(channel)
        _wait_until_routable(stub, len(procs))
        yield stub


def _wait_until_routable(stub: router_pb2_grpc.RouterServiceStub, num_workers: int) -> None:
    """Until requests reach every worker (the router learns their health in the background)."""
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while len(seen) < num_workers and time.monotonic() < deadline:
        for r in stub.Generate(request(max_new_tokens=1), timeout=30):
            seen.add(r.worker_id or "")
        time.sleep(0.05)
    assert len(seen) >= num_workers, f"requests reached only {seen}"


def request(max_new_tokens: int = MAX_TOKENS) -> router_pb2.RouterGenerateRequest:
    params = common_pb2.SamplingParams(
        temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True
    )
    return router_pb2.RouterGenerateRequest(text=PROMPT, sampling_params=params)


def tokens_of(replies: list[router_pb2.RouterGenerateResponse]) -> list[int]:
    return [t for r in replies for t in r.token_ids]


def running_on(procs: list[ServiceProc]) -> ServiceProc:
    """The worker whose engine runs a request right now (GetLoad's num_running)."""
    for p in procs:
        with grpc.insecure_channel(p.address) as channel:
            load = worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(), timeout=5
            )
        if load.num_running > 0:
            return p
    raise AssertionError("no worker is running the request")


def stream_and_kill(
    stub: router_pb2_grpc.RouterServiceStub, procs: list[ServiceProc]
) -> tuple[list[router_pb2.RouterGenerateResponse], ServiceProc]:
    """Stream a greedy request; once the client has KILL_AFTER tokens, kill -9 the worker that
    serves it; read on to the end (an error propagates)."""
    call = stub.Generate(request(), timeout=DEADLINE_S)
    replies: list[router_pb2.RouterGenerateResponse] = []
    victim = None
    for r in call:
        replies.append(r)
        if victim is None and len(tokens_of(replies)) >= KILL_AFTER:
            victim = running_on(procs)
            victim.kill()
    assert victim is not None
    return replies, victim


def test_kill_mid_stream_migrates(tmp_path: Path, tokenizer_proc: ServiceProc) -> None:
    with (
        workers(tmp_path, "--migration-limit", "3") as procs,
        router(tmp_path, tokenizer_proc, procs) as stub,
    ):
        expected = list(stub.Generate(request(), timeout=DEADLINE_S))
        assert len(tokens_of(expected)) == MAX_TOKENS
        replies, victim = stream_and_kill(stub, procs)
        assert tokens_of(replies) == tokens_of(expected)
        assert "".join(r.text for r in replies) == "".join(r.text for r in expected)
        assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        usage = replies[-1].usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (
            expected[-1].usage.prompt_tokens,
            MAX_TOKENS,
        )
        # the head came from the killed worker, the tail from the other one
        assert replies[0].worker_id == victim.address
        assert replies[-1].worker_id != victim.address


def test_kill_without_migration_limit_fails_clearly(
    tmp_path: Path, tokenizer_proc: ServiceProc
) -> None:
    with (
        workers(tmp_path, "--migration-limit", "0") as procs,
        router(tmp_path, tokenizer_proc, procs) as stub,
    ):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stream_and_kill(stub, procs)
        assert time.monotonic() - started < DEADLINE_S
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "migration limit" in (info.value.details() or "")
