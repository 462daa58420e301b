"""Graceful drain of every kind of worker, with real processes and a real ``consul agent -dev``:
a router that follows the catalog, two aggregated workers, a prefill and a decode worker
(Mooncake), the default model. SIGTERM on a worker must, at once, take it out of Consul (so
the router sends it nothing new), turn its health NOT_SERVING and refuse new calls; its
in-flight requests then finish within ``--grace-period`` — or, with a grace period too short
for them and migration on, move to another worker through the router — and it exits 0.

The tests share the mesh and run in order, each draining one worker for good:
an aggregated worker whose grace is too short (its request migrates), one whose grace is long
enough (its request finishes there), the prefill in the middle of a room, then the decode.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.discovery.dev_agent import ConsulDevAgent
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2
from tests.integration.procs import ServiceProc, free_port, worker_args
from tests.integration.test_mesh_observability import wait_until
from tests.integration.test_pd import Worker, decode_args, long_prompt, prefill_args, wait_idle

pytestmark = pytest.mark.model

CHECK_S = 0.5  # Consul's checks and the router's health checks
LONG_GRACE_S = 20.0
SHORT_GRACE_S = 1.0
MAX_TOKENS = 48
DEADLINE_S = 90.0
STEP = ("--max-num-batched-tokens", "128")
# prompts of at least this many tokens take the prefill/decode pair; shorter ones go whole to
# one of the generating workers (round-robin)
DISAGG_MIN = 128


@dataclass
class Mesh:
    agent: ConsulDevAgent
    router: router_pb2_grpc.RouterServiceStub
    procs: dict[str, ServiceProc]
    workers: dict[str, Worker]
    ids: dict[str, str] = field(default_factory=dict)  # worker name -> the router's id of it

    def catalog_ports(self) -> set[int]:
        services = self.agent.get("/v1/agent/services")
        assert isinstance(services, dict)
        return {int(s["Port"]) for s in services.values()}

    def routed(self) -> set[str]:
        """Addresses of the workers the router holds as healthy."""
        reply = self.router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5)
        return {w.address for w in reply.workers if w.healthy}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("drain")
    with ConsulDevAgent(log_path=log_dir / "consul.log") as agent:
        consul = [
            "--discovery", "consul", "--consul-addr", agent.http_addr,
            "--consul-check-interval", str(CHECK_S),
        ]  # fmt: skip
        long, short = ("--grace-period", str(LONG_GRACE_S)), ("--grace-period", str(SHORT_GRACE_S))
        specs = {
            "tokenizer": ("services.tokenizer", ["--grace-period", "1"]),
            "short": ("services.decode", worker_args("--migration-limit", "3", *STEP, *short)),
            "long": ("services.decode", worker_args("--migration-limit", "3", *STEP, *long)),
            "prefill": ("services.prefill", [*prefill_args("mooncake"), *long]),
            "decode": ("services.decode", [*decode_args("mooncake", "--migration-limit", "3"), *long]),
            "router": (
                "services.router",
                ["--grace-period", "1", "--health-check-interval", str(CHECK_S),
                 "--disagg-min-prompt-tokens", str(DISAGG_MIN)],
            ),
        }  # fmt: skip
        procs = {
            name: ServiceProc(module, [*args, *consul], name, free_port(), log_dir)
            for name, (module, args) in specs.items()
        }
        workers: dict[str, Worker] = {}
        try:
            for p in procs.values():
                p.wait_until_serving()
            workers = {n: Worker.of(procs[n]) for n in ("short", "long", "prefill", "decode")}
            with grpc.insecure_channel(procs["router"].address) as channel:
                m = Mesh(agent, router_pb2_grpc.RouterServiceStub(channel), procs, workers)
                every = {w.proc.address for w in workers.values()}
                wait_until("the router routes to every worker", lambda: every <= m.routed(), 60)
                listed = m.router.ListWorkers(router_pb2.ListWorkersRequest(), timeout=5).workers
                by_address = {w.address: w.id for w in listed}
                m.ids = {n: by_address[w.proc.address] for n, w in workers.items()}
                yield m
        finally:
            for w in workers.values():
                w.close()
            with ThreadPoolExecutor(max_workers=len(procs)) as pool:
                codes = dict(zip(procs, pool.map(ServiceProc.stop, procs.values())))
    assert all(code == 0 for code in codes.values()), codes


# -- helpers ------------------------------------------------------------------------------------

_pool = ThreadPoolExecutor(max_workers=8)


def request(
    prompt: list[int] | str, max_new_tokens: int = MAX_TOKENS
) -> router_pb2.RouterGenerateRequest:
    params = common_pb2.SamplingParams(
        temperature=0.0, max_new_tokens=max_new_tokens, ignore_eos=True
    )
    if isinstance(prompt, str):
        return router_pb2.RouterGenerateRequest(text=prompt, sampling_params=params)
    return router_pb2.RouterGenerateRequest(
        token_ids=router_pb2.TokenIds(ids=prompt), sampling_params=params
    )


Replies = list[router_pb2.RouterGenerateResponse]


def stream(
    mesh: Mesh, req: router_pb2.RouterGenerateRequest
) -> tuple[Future[Replies], threading.Event]:
    """Send ``req`` through the router in the background; the event is set at its first reply."""
    first = threading.Event()

    def run() -> Replies:
        replies = []
        for r in mesh.router.Generate(req, timeout=DEADLINE_S):
            replies.append(r)
            first.set()
        return replies

    return _pool.submit(run), first


def tokens_of(replies: Replies) -> list[int]:
    return [t for r in replies for t in r.token_ids]


class HealthWatch:
    """The statuses a worker's grpc.health.v1 Watch stream reports, collected in the
    background (a Watch opened before the drain sees NOT_SERVING; new calls are refused)."""

    def __init__(self, address: str) -> None:
        self.statuses: list[int] = []
        self._channel = grpc.insecure_channel(address)
        stub = health_pb2_grpc.HealthStub(self._channel)
        self._call = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=DEADLINE_S)
        self._done = _pool.submit(self._read)
        wait_until("the health watch reports", lambda: bool(self.statuses), 10)

    def _read(self) -> None:
        try:
            for reply in self._call:
                self.statuses.append(int(reply.status))
        except grpc.RpcError:
            pass  # the server went away

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


@dataclass
class Drain:
    """What a SIGTERM did to a worker, observed from outside."""

    left_catalog_s: float  # SIGTERM -> gone from Consul
    left_router_s: float  # SIGTERM -> no longer healthy in the router
    refused: grpc.StatusCode  # a new Generate sent straight to it meanwhile
    exit_code: int
    exited_s: float  # SIGTERM -> exit
    statuses: list[int]  # its health Watch, in order


def drain(mesh: Mesh, name: str, grace: float) -> Drain:
    """SIGTERM worker ``name`` and watch it leave (its in-flight requests are the caller's)."""
    worker = mesh.workers[name]
    proc = worker.proc
    watch = HealthWatch(proc.address)
    try:
        start = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        catalog_s = wait_until(
            f"{name} leaves Consul", lambda: proc.port not in mesh.catalog_ports(), 5
        )
        router_s = wait_until(
            f"the router stops routing to {name}", lambda: proc.address not in mesh.routed(), 5
        )
        refused = _refused_code(worker)
        if refused == grpc.StatusCode.OK:  # sent in the moment between deregistering and
            time.sleep(0.2)  # the server's stop; it must be refused right after
            refused = _refused_code(worker)
        wait_until(f"{name} reports NOT_SERVING", lambda: len(watch.statuses) > 1, 5)
        watch.close()  # an open Watch is an in-flight call too: it would hold the drain
        code = proc.proc.wait(timeout=grace + 15)  # the drain is bounded by --grace-period
        exited_s = time.monotonic() - start
        proc.stop()  # reaped: closes its log
    finally:
        watch.close()
    return Drain(catalog_s, router_s, refused, code, exited_s, watch.statuses)


def _refused_code(worker: Worker) -> grpc.StatusCode:
    """The status a new Generate sent straight to ``worker`` gets (OK if it was served)."""
    req = worker_pb2.GenerateRequest(
        request_id=f"after-sigterm-{time.monotonic_ns()}",
        token_ids=[1, 2, 3],
        sampling_params=common_pb2.SamplingParams(max_new_tokens=1),
    )
    try:
        list(worker.stub.Generate(req, timeout=10))
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def check_left_at_once(d: Drain, name: str) -> None:
    # deregistered before anything else, and refusing new work while it drains
    assert d.left_catalog_s < 1.0, f"{name} left Consul {d.left_catalog_s:.2f}s after SIGTERM"
    assert d.refused == grpc.StatusCode.UNAVAILABLE, d.refused
    assert d.statuses[0] == health_pb2.HealthCheckResponse.SERVING, d.statuses
    assert health_pb2.HealthCheckResponse.NOT_SERVING in d.statuses[1:], d.statuses
    assert d.exit_code == 0, f"{name} exited with {d.exit_code}"


def on_worker(mesh: Mesh, name: str, within: float = 20) -> None:
    """Until worker ``name`` runs a request (or, a prefill, holds a room)."""
    worker = mesh.workers[name]

    def busy() -> bool:
        load = worker.load()
        return load.num_running + load.num_rooms > 0

    wait_until(f"{name} is busy", busy, within)


# -- the tests ----------------------------------------------------------------------------------


def test_reference_run(mesh: Mesh) -> None:
    """Greedy outputs with no fault, to compare the drained runs with."""
    for prompt in (PROMPT, long_prompt(DISAGG_MIN + 72, seed=7)):
        replies = list(mesh.router.Generate(request(prompt), timeout=DEADLINE_S))
        assert len(tokens_of(replies)) == MAX_TOKENS
        EXPECTED[str(prompt)] = tokens_of(replies)


PROMPT = "Once upon a time"
EXPECTED: dict[str, list[int]] = {}


def _three_streams(mesh: Mesh) -> list[tuple[Future[Replies], threading.Event]]:
    """One short-prompt request per generating worker (round-robin), all streaming."""
    streams = [stream(mesh, request(PROMPT)) for _ in range(3)]
    for _, first in streams:
        assert first.wait(60), "a request never started"
    return streams


def test_short_grace_migrates_the_rest(mesh: Mesh) -> None:
    """Grace of 1 s, requests of 48 tokens: what is left at the end of the grace period moves
    to another worker, and the client sees one uninterrupted, correct stream."""
    streams = _three_streams(mesh)
    d = drain(mesh, "short", SHORT_GRACE_S)
    check_left_at_once(d, "short")
    victim = mesh.ids["short"]
    moved = 0
    for future, _ in streams:
        replies = future.result(timeout=DEADLINE_S)
        assert tokens_of(replies) == EXPECTED[PROMPT]
        assert replies[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert replies[-1].usage.completion_tokens == MAX_TOKENS
        workers = [r.worker_id for r in replies]
        if workers[0] == victim:
            assert workers[-1] != victim, "the drained worker's request was not moved"
            moved += 1
    assert moved >= 1, "no request ran on the drained worker"
    for name in ("long", "decode"):
        wait_idle(mesh.workers[name], within=3.0)


def test_long_grace_finishes_in_flight(mesh: Mesh) -> None:
    """Grace of 20 s: the drained worker finishes its request itself, then exits 0."""
    streams = _three_streams(mesh)
    d = drain(mesh, "long", LONG_GRACE_S)
    check_left_at_once(d, "long")
    victim = mesh.ids["long"]
    on_victim = 0
    for future, _ in streams:
        replies = future.result(timeout=DEADLINE_S)
        assert tokens_of(replies) == EXPECTED[PROMPT]
        if replies[0].worker_id == victim:
            assert {r.worker_id for r in replies} == {victim}, "it moved instead of finishing"
            on_victim += 1
    assert on_victim >= 1, "no request ran on the drained worker"
    assert d.exited_s < LONG_GRACE_S, "it waited out its grace period with nothing left"
    wait_idle(mesh.workers["decode"], within=3.0)


def test_prefill_finishes_its_room(mesh: Mesh) -> None:
    """SIGTERM while the prefill works on a room: the room is prefilled and its KV sent, the
    decode streams the request to the end, the prefill exits 0."""
    prompt = long_prompt(DISAGG_MIN + 72, seed=7)
    future, _ = stream(mesh, request(prompt))
    on_worker(mesh, "prefill")
    d = drain(mesh, "prefill", LONG_GRACE_S)
    check_left_at_once(d, "prefill")
    replies = future.result(timeout=DEADLINE_S)
    assert tokens_of(replies) == EXPECTED[str(prompt)]
    assert replies[-1].worker_id == mesh.ids["decode"]
    wait_idle(mesh.workers["decode"], within=3.0)


def test_decode_finishes_in_flight(mesh: Mesh) -> None:
    """The last worker: SIGTERM while it streams; the request ends whole, the worker exits 0
    (and the router, left with none, says so clearly)."""
    future, first = stream(mesh, request(PROMPT))
    assert first.wait(60)
    d = drain(mesh, "decode", LONG_GRACE_S)
    check_left_at_once(d, "decode")
    assert tokens_of(future.result(timeout=DEADLINE_S)) == EXPECTED[PROMPT]
    with pytest.raises(grpc.RpcError) as info:
        list(mesh.router.Generate(request(PROMPT), timeout=DEADLINE_S))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
