"""Migration in PD mode with real processes: a prefill, decode workers, a router in PD mode,
Mooncake over tcp, the default model. The decode streaming a disaggregated request is
``kill -9``-ed mid-stream. With ``--migration-limit 3`` the router moves the request to the
other decode (which prefills prompt + tokens so far itself) and the client's output equals a
fault-free greedy run; with ``--migration-limit 0`` the client gets a clear UNAVAILABLE within
its deadline, although another decode is there. Afterwards the prefill and the surviving
decode hold no page, room or request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.integration.procs import ServiceProc, start_service
from tests.integration.test_pd import Worker, decode_args, prefill_args, start_all, wait_idle
from tests.integration.test_router_migration import (
    DEADLINE_S,
    MAX_TOKENS,
    request,
    stream_and_kill,
    tokens_of,
)

pytestmark = pytest.mark.model


@dataclass
class PD:
    prefill: Worker
    decodes: list[Worker]  # --migration-limit 3
    no_migration: Worker  # a decode with --migration-limit 0

    def alive(self) -> list[Worker]:
        return [d for d in self.decodes if d.proc.proc.poll() is None]


@pytest.fixture(scope="module")
def pd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PD]:
    log_dir = tmp_path_factory.mktemp("pd-migration")
    procs = start_all(
        [
            ("services.prefill", prefill_args("mooncake"), "prefill"),
            ("services.decode", decode_args("mooncake", "--migration-limit", "3"), "decode-1"),
            ("services.decode", decode_args("mooncake", "--migration-limit", "3"), "decode-2"),
            ("services.decode", decode_args("mooncake", "--migration-limit", "0"), "decode-0"),
        ],
        log_dir,
    )
    workers = [Worker.of(p) for p in procs]
    try:
        yield PD(workers[0], workers[1:3], workers[3])
    finally:
        for w in workers:
            w.close()
        alive = [w.proc for w in workers if w.proc.proc.poll() is None]  # not the killed ones
        # side by side: a PD worker takes seconds to exit after it stopped serving
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            list(pool.map(ServiceProc.stop_and_check, alive))


@contextmanager
def pd_router(
    tmp_path: Path, tokenizer: ServiceProc, prefill: Worker, decodes: list[Worker]
) -> Iterator[router_pb2_grpc.RouterServiceStub]:
    """A PD router over ``prefill`` and ``decodes`` (round-robin, in this order), once it has
    found every worker healthy; no request has been routed yet."""
    args = [
        "--prefill-workers", prefill.proc.address,
        "--decode-workers", ",".join(d.proc.address for d in decodes),
        "--tokenizer", tokenizer.address, "--health-check-interval", "0.5", "--grace-period", "2",
    ]  # fmt: skip
    with (
        start_service("services.router", args, "router-pd", log_dir=tmp_path) as svc,
        grpc.insecure_channel(svc.address) as channel,
    ):
        stub = router_pb2_grpc.RouterServiceStub(channel)
        deadline = time.monotonic() + 30
        while not all(w.healthy for w in stub.ListWorkers(router_pb2.ListWorkersRequest()).workers):
            assert time.monotonic() < deadline, "the router never found every worker healthy"
            time.sleep(0.05)
        yield stub


def test_kill_decode_mid_stream_migrates(
    pd: PD, tmp_path: Path, tokenizer_proc: ServiceProc
) -> None:
    with pd_router(tmp_path, tokenizer_proc, pd.prefill, pd.decodes) as stub:
        rooms = pd.prefill.load().total_rooms
        expected = list(stub.Generate(request(), timeout=DEADLINE_S))
        assert len(tokens_of(expected)) == MAX_TOKENS
        replies, victim = stream_and_kill(stub, [d.proc for d in pd.decodes])
        # both were disaggregated: the prefill ran a room for each
        assert pd.prefill.load().total_rooms == rooms + 2
    assert tokens_of(replies) == tokens_of(expected)
    assert "".join(r.text for r in replies) == "".join(r.text for r in expected)
    assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    usage = replies[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (
        expected[-1].usage.prompt_tokens,
        MAX_TOKENS,
    )
    # the head came from the killed decode, the tail from the other one
    (survivor,) = pd.alive()
    assert replies[0].worker_id == victim.address
    assert replies[-1].worker_id == survivor.proc.address
    for w in (pd.prefill, survivor):
        assert wait_idle(w, within=1.0) <= 1.0


def test_kill_decode_without_migration_limit_fails_clearly(
    pd: PD, tmp_path: Path, tokenizer_proc: ServiceProc
) -> None:
    # the limit-0 decode first: a fresh round-robin router sends the first request to it,
    # and the other decode (limit 3) stays there to show the error is the limit's
    others = pd.alive()[:1]
    with pd_router(tmp_path, tokenizer_proc, pd.prefill, [pd.no_migration, *others]) as stub:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            stream_and_kill(stub, [pd.no_migration.proc])
        assert time.monotonic() - started < DEADLINE_S
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details() or ""
    assert "migration limit (0) reached" in details and pd.no_migration.proc.address in details
    for w in (pd.prefill, *others):
        assert wait_idle(w, within=1.0) <= 1.0
