"""The mesh the chaos and soak runs break: a real ``consul agent -dev``, two tokenizers, two
routers, a gateway (which finds both routers in Consul), two aggregated workers and, with
``pd=True``, a prefill/decode pair moving KV with Mooncake. Every service is a real process
(``tests.integration.procs``) registered in Consul; workers allow migration
(``--migration-limit 3``).

    mesh = ChaosMesh(log_dir, pd=True).start()
    m = mesh.member("worker-a"); m.proc.kill(); mesh.restart("worker-a")
    mesh.wait_in_use("worker-a")     # every router routes to it again
    assert mesh.pages_in_use(within=10) == {...: 0}

A restarted member gets the same port (so the same Consul service id and address) and a new
log file (``<name>.<n>.log``).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc

from pdmesh.discovery import GATEWAY, PREFILL, ROUTER, TOKENIZER, WORKER
from pdmesh.discovery.dev_agent import ConsulDevAgent
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.integration.procs import STARTUP_TIMEOUT_S, ServiceProc, free_port, worker_args
from tests.integration.test_mesh_observability import wait_until as wait_for

CHECK_INTERVAL_S = 1.0  # Consul's checks of every instance
HEALTH_CHECK_S = 1.0  # each router's checks of its workers
GRACE_S = 10.0  # every service's --grace-period
STEP = ("--max-num-batched-tokens", "128")  # short engine steps: aborts land quickly
POLL_S = 0.05
RPC_TIMEOUT_S = 5.0

SERVICE_OF_ROLE = {
    "tokenizer": TOKENIZER,
    "router": ROUTER,
    "gateway": GATEWAY,
    "worker": WORKER,
    "decode": WORKER,
    "prefill": PREFILL,
}
WORKER_ROLES = ("worker", "decode", "prefill")


@dataclass
class Member:
    role: str  # tokenizer, router, gateway, worker (aggregated), decode, prefill
    name: str
    module: str
    args: list[str]
    port: int
    proc: ServiceProc
    starts: int = 1

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc.proc.poll() is None


class ChaosMesh:
    def __init__(
        self,
        log_dir: Path,
        pd: bool = True,
        deadline_s: float = 30.0,
        disagg_min_prompt_tokens: int = 32,
        stepping_ms: float = 0.0,
    ) -> None:
        """``deadline_s``: the gateway's --request-timeout (every request's deadline);
        ``disagg_min_prompt_tokens``: shorter prompts skip the PD pair; ``stepping_ms`` > 0:
        the two aggregated workers are model-free stepping workers (``benchmarks.mesh.
        stepping_worker``) giving every active request a token each ``stepping_ms``, so the
        mesh carries a GPU worker's thousands of tokens per second (no PD pair then)."""
        self.log_dir = log_dir
        self.pd = pd and not stepping_ms
        self.stepping_ms = stepping_ms
        self.deadline_s = deadline_s
        self.disagg_min_prompt_tokens = disagg_min_prompt_tokens
        self.agent = ConsulDevAgent(log_path=log_dir / "consul.log")
        self.members: dict[str, Member] = {}

    # -- the members -----------------------------------------------------------------------

    def consul_args(self) -> list[str]:
        return [
            "--discovery", "consul", "--consul-addr", self.agent.http_addr,
            "--consul-check-interval", str(CHECK_INTERVAL_S),
        ]  # fmt: skip

    def _specs(self) -> list[tuple[str, str, str, list[str]]]:
        """(role, name, module, args) of every member, in start order."""
        grace = ["--grace-period", str(GRACE_S)]
        worker = [*worker_args("--migration-limit", "3", *STEP), *grace]
        module = "services.decode"
        if self.stepping_ms:
            module = "benchmarks.mesh.stepping_worker"
            worker = [
                "--step-ms", str(self.stepping_ms), "--max-running-requests", "512",
                "--num-pages", "65536", "--max-model-len", "2048", *grace,
            ]  # fmt: skip
        specs = [
            # two tokenizers, as a production mesh runs them: the one a fault hits leaves the
            # routers the other for requests not yet tokenized
            ("tokenizer", "tokenizer", "services.tokenizer", grace),
            ("tokenizer", "tokenizer-2", "services.tokenizer", grace),
            ("worker", "worker-a", module, worker),
            ("worker", "worker-b", module, worker),
        ]
        if self.pd:
            specs += [
                (
                    "prefill",
                    "prefill",
                    "services.prefill",
                    [*worker_args("--bootstrap-port", "0", *STEP), *grace],
                ),
                (
                    "decode",
                    "decode",
                    "services.decode",
                    [
                        *worker_args("--mode", "decode", "--migration-limit", "3", *STEP),
                        "--heartbeat-interval",
                        "1",
                        "--heartbeat-max-failures",
                        "2",
                        "--waiting-timeout",
                        "20",
                        *grace,
                    ],  # fmt: skip
                ),
            ]
        router = [
            *grace,
            "--health-check-interval", str(HEALTH_CHECK_S),
            "--rpc-timeout", "3",
            "--disagg-min-prompt-tokens", str(self.disagg_min_prompt_tokens),
        ]  # fmt: skip
        specs += [
            ("router", "router-1", "services.router", router),
            ("router", "router-2", "services.router", router),
            (
                "gateway",
                "gateway",
                "services.gateway",
                ["--grace-period", str(GRACE_S), "--request-timeout", str(self.deadline_s)],
            ),
        ]
        return specs

    def start(self) -> ChaosMesh:
        """Consul, then every service side by side (model loads overlap); returns when the mesh
        serves: every router routes to every worker, the gateway answers."""
        self.agent.start()
        try:
            for role, name, module, args in self._specs():
                args = [*args, *self.consul_args()]
                port = free_port()
                proc = ServiceProc(module, args, name, port, self.log_dir)
                self.members[name] = Member(role, name, module, args, port, proc)
            for m in self.members.values():
                self.wait_serving(m)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def member(self, name: str) -> Member:
        return self.members[name]

    def of_role(self, *roles: str) -> list[Member]:
        return [m for m in self.members.values() if m.role in roles]

    def restart(self, name: str) -> Member:
        """Start ``name`` again on its port (its old process must be gone)."""
        m = self.members[name]
        assert not m.alive, f"{name} is still running"
        m.proc.stop()  # reaps it and closes its log (no signal: it is gone)
        m.starts += 1
        m.proc = ServiceProc(m.module, m.args, f"{name}.{m.starts}", m.port, self.log_dir)
        return m

    def stop(self) -> list[str]:
        """SIGTERM every member side by side, then the agent; the members that did not exit 0
        (name, code and log tail)."""
        alive = [m for m in self.members.values() if m.proc.returncode is None]
        with ThreadPoolExecutor(max_workers=max(len(alive), 1)) as pool:
            codes = list(pool.map(lambda m: m.proc.stop(), alive))
        self.agent.stop()
        return [
            f"{m.name} exited with {code}:\n{m.proc.log[-2000:]}"
            for m, code in zip(alive, codes)
            if code != 0
        ]

    # -- waiting for members -----------------------------------------------------------------

    def wait_serving(self, m: Member, timeout: float = STARTUP_TIMEOUT_S) -> float:
        """Seconds until ``m`` answers: gRPC health SERVING, or the gateway's HTTP /health."""
        start = time.monotonic()
        if m.role != "gateway":
            m.proc.wait_until_serving(timeout)
        else:
            wait_for(f"{m.name} answers HTTP", lambda: self._gateway_answers(m), timeout)
        return time.monotonic() - start

    def _gateway_answers(self, m: Member) -> bool:
        assert m.alive, f"{m.name} exited:\n{m.proc.log[-3000:]}"
        try:
            with urllib.request.urlopen(f"http://{m.address}/health", timeout=2) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError:
            return False  # 503: up, but no router answers yet
        except OSError:
            return False

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Until every member is in use: see ``in_use``."""
        start = time.monotonic()
        for m in self.members.values():
            self.wait_in_use(m.name, timeout=max(timeout - (time.monotonic() - start), 1.0))
        return time.monotonic() - start

    def wait_in_use(self, name: str, timeout: float = 60.0) -> float:
        """Seconds until the mesh uses ``name`` again (see ``in_use``)."""
        return wait_for(f"{name} is in use", lambda: self.in_use(name), timeout)

    def in_use(self, name: str) -> bool:
        """Workers: every router lists it healthy. Routers and the tokenizer: passing in Consul
        (what the gateway and routers follow) and a request through each router completes.
        The gateway: /health answers 200 and a completion through it returns."""
        m = self.members[name]
        if not m.alive:
            return False
        if m.role in WORKER_ROLES:
            return all(self._router_sees_healthy(r, m) for r in self.of_role("router"))
        if not self.passing(m):
            return False
        if m.role == "router":
            return self.probe_router(m)
        if m.role == "tokenizer":
            return all(self.probe_router(r) for r in self.of_role("router"))
        return self._gateway_answers(m) and self.probe_gateway(m)

    def _router_sees_healthy(self, router: Member, worker: Member) -> bool:
        if not router.alive:
            return False
        try:
            with grpc.insecure_channel(router.address) as channel:
                reply = router_pb2_grpc.RouterServiceStub(channel).ListWorkers(
                    router_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT_S
                )
        except grpc.RpcError:
            return False
        return any(w.address == worker.address and w.healthy for w in reply.workers)

    def probe_router(self, router: Member) -> bool:
        """Whether a one-token request straight through ``router`` completes."""
        request = router_pb2.RouterGenerateRequest(
            text="Hi", sampling_params=common_pb2.SamplingParams(max_new_tokens=1)
        )
        try:
            with grpc.insecure_channel(router.address) as channel:
                replies = list(
                    router_pb2_grpc.RouterServiceStub(channel).Generate(
                        request, timeout=RPC_TIMEOUT_S * 2
                    )
                )
        except grpc.RpcError:
            return False
        return bool(replies) and replies[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED

    def probe_gateway(self, gateway: Member) -> bool:
        body = json.dumps({"model": self.model_name(), "prompt": "Hi", "max_tokens": 1}).encode()
        request = urllib.request.Request(
            f"http://{gateway.address}/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S * 2) as response:
                return bool(json.load(response)["choices"])
        except (OSError, ValueError, KeyError):
            return False

    def model_name(self) -> str:
        worker = self.of_role("worker")[0]
        with grpc.insecure_channel(worker.address) as channel:
            info = worker_pb2_grpc.WorkerServiceStub(channel).GetModelInfo(
                worker_pb2.GetModelInfoRequest(), timeout=RPC_TIMEOUT_S
            )
        return str(info.model_name)

    # -- Consul ------------------------------------------------------------------------------

    def passing(self, m: Member) -> bool:
        """Whether ``m`` is registered and passing its check in Consul."""
        try:
            entries = self.agent.get(f"/v1/health/service/{SERVICE_OF_ROLE[m.role]}?passing=1")
        except OSError:
            return False
        assert isinstance(entries, list)
        return any(e["Service"]["Port"] == m.port for e in entries)

    def all_passing(self) -> bool:
        return all(self.passing(m) for m in self.members.values())

    # -- KV pages ----------------------------------------------------------------------------

    def load_of(self, m: Member) -> worker_pb2.GetLoadResponse:
        with grpc.insecure_channel(m.address) as channel:
            return worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S
            )

    def busy(self, m: Member) -> bool:
        """Whether worker ``m`` has a request running (or, a prefill, a room open)."""
        try:
            load = self.load_of(m)
        except grpc.RpcError:
            return False
        return load.num_running > 0 or load.num_rooms > 0

    def pages_in_use(self, within: float) -> dict[str, int]:
        """Per live worker: KV pages held plus requests and rooms still open, once all are 0 or
        ``within`` seconds passed (cancellations free pages between engine steps)."""
        deadline = time.monotonic() + within
        while True:
            held = {m.name: _held(self.load_of(m)) for m in self.of_role(*WORKER_ROLES) if m.alive}
            if not any(held.values()) or time.monotonic() > deadline:
                return held
            time.sleep(POLL_S * 4)

    def pids(self) -> Iterator[tuple[str, int]]:
        """(name, pid) of every live process, the Consul agent included."""
        for m in self.members.values():
            if m.alive:
                yield m.name, m.proc.pid
        if self.agent.proc is not None and self.agent.running:
            yield "consul", self.agent.proc.pid


def _held(load: worker_pb2.GetLoadResponse) -> int:
    pages = load.num_total_pages - load.num_free_pages
    return pages + load.num_running + load.num_waiting + load.num_rooms
