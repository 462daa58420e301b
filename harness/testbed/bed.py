"""The multi-host bed: pdmesh across three network-namespace hosts on one machine.

    with MultiHostBed(BedConfig(log_dir)) as bed:      # returns once the mesh serves
        bed.gateway_url                                 # http://127.0.0.1:<p>, forwarded into A
        bed.local("router-c")                           # 127.0.0.1:<p> -> router on host C
        bed.catalog("pdmesh-worker")                    # Consul's view, from A's server
        bed.partition("c"); bed.heal("c")               # C's links down / up
        bed.kill_host("b"); bed.restart_host("b")       # every process of B at once

Hosts (``netns.Network``: addresses only inside the namespaces, torn down on any exit):

| host | address | runs |
| --- | --- | --- |
| a | 10.77.0.1 | Consul server, tokenizer, router-a, gateway |
| b | 10.77.0.2 | Consul client agent, prefill (bootstrap :8998); with ``pairs`` a decode too |
| c | 10.77.0.3 | Consul client agent, decode, router-c; with ``pairs`` a prefill too |

Each host's Consul agent binds its gossip address (10.77.1.x) and joins A's server with
``retry_join`` (real serf gossip); its HTTP API listens on the host's own loopback, where that
host's services register (``--consul-addr 127.0.0.1:8500``), each with ``--host`` its service
address, which is what it registers (router-c binds 0.0.0.0 and registers
``--advertise-address``, the wildcard path). Every host has its own port space, so ports are
fixed.
Mooncake moves KV from B's prefill into C's decode over tcp across the veth links; the decode
asks Mooncake for rdma on ``mlx5_0`` (``--kv-transfer-protocol rdma``), which no host here has,
so it shows the fallback to tcp too.

The test process reaches the hosts through one ``forward`` process per host, which accepts on
listeners bound in the caller's namespace (``127.0.0.1:<free>``). Every process of the bed is
started with a parent-death signal: if the caller dies, they die with it, and the next bed
removes the namespaces left behind (``netns.reap_stale``).
"""

from __future__ import annotations

import ctypes
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from harness.testbed.netns import Network
from pdmesh.discovery import GATEWAY, PREFILL, ROUTER, TOKENIZER, WORKER

REPO_ROOT = Path(__file__).resolve().parents[2]  # services/ lives beside pdmesh/
HOSTS = ("a", "b", "c")
CONSUL_HTTP_PORT = 8500
BOOTSTRAP_PORT = 8998  # the prefill's Mooncake bootstrap server
STARTUP_TIMEOUT_S = 180.0  # the first start may convert the default model
STOP_TIMEOUT_S = 30.0
RPC_TIMEOUT_S = 5.0
POLL_S = 0.1
WORKER_ARGS = ("--device", "cpu", "--num-pages", "256", "--max-model-len", "2048")
STEP = ("--max-num-batched-tokens", "128")
SERVICE_OF_ROLE = {
    "tokenizer": TOKENIZER,
    "router": ROUTER,
    "gateway": GATEWAY,
    "decode": WORKER,
    "prefill": PREFILL,
}
WORKER_ROLES = ("prefill", "decode")
WILDCARD_BINDS = ("router-c",)  # bound to 0.0.0.0, registered with --advertise-address
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # in the child, between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def wait_until(what: str, check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` is true; ``AssertionError`` naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(POLL_S)
    return time.monotonic() - start


class HostProc:
    """One process inside a host, logging to ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        net: Network,
        host: str,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        pass_fds: Sequence[int] = (),
    ) -> None:
        """``pass_fds``: file descriptors the process inherits (the forwarders' listeners)."""
        self.host = host
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            net.command(host, argv),
            cwd=log_dir if argv[0].endswith("consul") else REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            pass_fds=tuple(pass_fds),
            preexec_fn=_die_with_parent,
        )
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait (SIGKILL past ``timeout``); the exit code. Idempotent."""
        if self.returncode is None:
            if self.popen.poll() is None:
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.returncode = self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.returncode = self.popen.wait()
            self._log.close()
        return self.returncode

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.returncode = self.popen.wait()
        self._log.close()


@dataclass
class Service:
    role: str  # tokenizer, router, gateway, prefill, decode
    name: str
    host: str
    module: str
    port: int
    args: list[str]
    address: str  # host address:port, what it registers and others dial
    local: str = ""  # 127.0.0.1:<p> in the caller's namespace, forwarded to ``address``
    proc: HostProc | None = None
    starts: int = 0
    # listens on 0.0.0.0 and registers --advertise-address (the wildcard path); else --host is
    # its host's address
    bind_any: bool = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive


@dataclass(frozen=True)
class BedConfig:
    log_dir: Path
    deadline_s: float = 30.0  # the gateway's --request-timeout
    consul_check_interval: float = 1.0
    health_check_s: float = 1.0  # each router's checks of its workers
    disagg_min_prompt_tokens: int = 4  # shorter prompts skip the PD pair
    grace_s: float = 5.0
    decode_protocol: str = "rdma"  # --kv-transfer-protocol of the decode (falls back here)
    ib_device: str = "mlx5_0"  # its --disaggregation-ib-device
    consul: str = "consul"
    # a prefill and a decode on each of B and C (the host faults need a pair to survive one
    # host); False: B's prefill and C's decode only (the default suite's short bed)
    pairs: bool = False
    extra_args: dict[str, list[str]] = field(default_factory=dict)  # by service name


class MultiHostBed:
    def __init__(self, config: BedConfig) -> None:
        self.config = config
        config.log_dir.mkdir(parents=True, exist_ok=True)
        # every port a service listens on, so no outgoing connection inside a host takes one
        ports = [port for *_, port, _ in self._specs()]
        self.net = Network(HOSTS, reserved_ports=[*ports, BOOTSTRAP_PORT, CONSUL_HTTP_PORT])
        self.services: dict[str, Service] = {}
        self.agents: dict[str, HostProc] = {}
        self.forwarders: dict[str, HostProc] = {}
        self._consul_local: dict[str, str] = {}
        self._agent_starts: dict[str, int] = {}

    # -- layout ------------------------------------------------------------------------------

    def _specs(self) -> list[tuple[str, str, str, str, int, list[str]]]:
        """(role, name, host, module, port, args) of every service, in start order."""
        c = self.config
        grace = ["--grace-period", str(c.grace_s)]
        router = [
            *grace,
            "--health-check-interval", str(c.health_check_s),
            "--rpc-timeout", "3",
            "--disagg-min-prompt-tokens", str(c.disagg_min_prompt_tokens),
        ]  # fmt: skip
        prefill = [*WORKER_ARGS, *STEP, *grace, "--bootstrap-port", str(BOOTSTRAP_PORT)]
        decode = [
            *WORKER_ARGS, *STEP, *grace,
            "--mode", "decode", "--migration-limit", "3",
            "--heartbeat-interval", "1", "--heartbeat-max-failures", "2",
            "--waiting-timeout", "20",
            "--kv-transfer-protocol", c.decode_protocol,
            "--disaggregation-ib-device", c.ib_device,
        ]  # fmt: skip
        gateway = [*grace, "--request-timeout", str(c.deadline_s)]
        workers = [
            ("prefill", "prefill-b", "b", "services.prefill", 50054, prefill),
            ("decode", "decode-c", "c", "services.decode", 50053, decode),
        ]
        if c.pairs:
            workers += [
                ("decode", "decode-b", "b", "services.decode", 50053, decode),
                ("prefill", "prefill-c", "c", "services.prefill", 50054, prefill),
            ]
        return [
            ("tokenizer", "tokenizer", "a", "services.tokenizer", 50051, grace),
            *workers,
            ("router", "router-a", "a", "services.router", 50052, router),
            ("router", "router-c", "c", "services.router", 50052, router),
            ("gateway", "gateway", "a", "services.gateway", 8080, gateway),
        ]

    def consul_args(self) -> list[str]:
        return [
            "--discovery", "consul", "--consul-addr", f"127.0.0.1:{CONSUL_HTTP_PORT}",
            "--consul-check-interval", str(self.config.consul_check_interval),
        ]  # fmt: skip

    # -- life --------------------------------------------------------------------------------

    def start(self) -> MultiHostBed:
        """Namespaces, forwarders, Consul (server, then the clients, until all three are
        members), every service side by side; returns once the gateway's completions go
        through the PD pair and each router sees both workers healthy."""
        try:
            self.net.create()
            for role, name, host, module, port, args in self._specs():
                args = [*args, *self.config.extra_args.get(name, []), *self.consul_args()]
                address = f"{self.net.address(host)}:{port}"
                bind_any = name in WILDCARD_BINDS
                if bind_any:
                    args += ["--advertise-address", self.net.address(host)]
                self.services[name] = Service(
                    role, name, host, module, port, args, address, bind_any=bind_any
                )
            self._start_forwarders()
            for host in HOSTS:
                self.start_agent(host)
            self.wait_members(timeout=60)
            for s in self.services.values():
                self.start_service(s.name)
            for s in self.services.values():
                self.wait_serving(s.name)
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_forwarders(self) -> None:
        by_host: dict[str, list[tuple[socket.socket, str, int]]] = {h: [] for h in HOSTS}
        for s in self.services.values():
            by_host[s.host].append((_listener(), self.net.address(s.host), s.port))
            s.local = _local(by_host[s.host][-1][0])
        for host in HOSTS:
            by_host[host].append((_listener(), "127.0.0.1", CONSUL_HTTP_PORT))
            self._consul_local[host] = _local(by_host[host][-1][0])
        for host, listeners in by_host.items():
            specs = [f"{sock.fileno()}={h}:{p}" for sock, h, p in listeners]
            argv = [sys.executable, "-m", "harness.testbed.forward", *specs]
            fds = [sock.fileno() for sock, _, _ in listeners]
            self.forwarders[host] = HostProc(
                self.net, host, f"forward-{host}", argv, self.config.log_dir, fds
            )
            for sock, _, _ in listeners:
                sock.close()  # the forwarder holds them now

    def agent_argv(self, host: str) -> list[str]:
        c = self.config
        common = [
            "-node", f"host-{host}", "-bind", self.net.gossip_address(host),
            "-client", "127.0.0.1", "-http-port", str(CONSUL_HTTP_PORT),
            "-dns-port", "-1", "-grpc-port", "-1", "-log-level", "info",
        ]  # fmt: skip
        if host == "a":
            return [c.consul, "agent", "-dev", *common]
        data = self.config.log_dir / f"consul-{host}-data"
        return [
            c.consul, "agent", *common, "-data-dir", str(data),
            "-retry-join", self.net.gossip_address("a"), "-retry-interval", "1s",
        ]  # fmt: skip

    def start_agent(self, host: str) -> HostProc:
        n = self._agent_starts.get(host, 0) + 1
        self._agent_starts[host] = n
        name = f"consul-{host}" + (f".{n}" if n > 1 else "")
        self.agents[host] = HostProc(
            self.net, host, name, self.agent_argv(host), self.config.log_dir
        )
        return self.agents[host]

    def start_service(self, name: str) -> Service:
        """Start ``name`` (again) on its host and port; its old process must be gone."""
        s = self.services[name]
        assert not s.alive, f"{name} is still running"
        if s.proc is not None:
            s.proc.stop()  # reaps it, closes its log
        s.starts += 1
        bind = "0.0.0.0" if s.bind_any else self.net.address(s.host)
        argv = [sys.executable, "-m", s.module, "--host", bind]
        argv += ["--port", str(s.port), *s.args]
        label = s.name + (f".{s.starts}" if s.starts > 1 else "")
        s.proc = HostProc(self.net, s.host, label, argv, self.config.log_dir)
        return s

    def stop(self) -> list[str]:
        """SIGTERM every service side by side, then the agents and forwarders, then delete the
        namespaces. Returns the services that did not exit 0 (name, code, log tail)."""
        running = [s for s in self.services.values() if s.proc is not None]
        with ThreadPoolExecutor(max_workers=max(len(running), 1)) as pool:
            codes = list(pool.map(lambda s: s.proc.stop() if s.proc else 0, running))
        for proc in [*self.agents.values(), *self.forwarders.values()]:
            proc.stop(timeout=10)
        self.net.close()
        return [
            f"{s.name} exited with {code}:\n{s.proc.log[-2000:] if s.proc else ''}"
            for s, code in zip(running, codes)
            if code != 0
        ]

    def __enter__(self) -> MultiHostBed:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults ------------------------------------------------------------------------------

    def partition(self, host: str, nets: Sequence[str] = ("service", "gossip")) -> None:
        """Cut ``host`` off (its switch ports down); its processes keep running."""
        self.net.set_link(host, up=False, nets=nets)

    def heal(self, host: str, nets: Sequence[str] = ("service", "gossip")) -> None:
        self.net.set_link(host, up=True, nets=nets)

    def kill_host(self, host: str) -> list[str]:
        """SIGKILL every process of ``host`` (its Consul agent and services) at once; the names
        killed. The forwarder, which is the test's and not the host's, stays."""
        procs = [(s.name, s.proc) for s in self.services.values() if s.host == host and s.proc]
        if host in self.agents:
            procs.append((f"consul-{host}", self.agents[host]))
        for _, p in procs:
            if p is not None and p.alive:
                p.popen.send_signal(signal.SIGKILL)
        for _, p in procs:
            if p is not None:
                p.kill()
        return [name for name, _ in procs]

    def restart_host(self, host: str) -> None:
        """Its Consul agent and every service again, as after a reboot."""
        self.start_agent(host)
        for s in self.services.values():
            if s.host == host:
                self.start_service(s.name)

    # -- looking in ----------------------------------------------------------------------------

    @property
    def gateway_url(self) -> str:
        return f"http://{self.services['gateway'].local}"

    def local(self, name: str) -> str:
        return self.services[name].local

    def of_role(self, *roles: str) -> list[Service]:
        return [s for s in self.services.values() if s.role in roles]

    def consul_get(self, path: str, host: str = "a") -> object:
        """GET ``path`` of ``host``'s Consul agent (A: the server), decoded JSON."""
        url = f"http://{self._consul_local[host]}{path}"
        with urllib.request.urlopen(url, timeout=RPC_TIMEOUT_S) as response:
            return json.loads(response.read() or b"null")

    def members(self, host: str = "a") -> dict[str, int]:
        """Node name -> serf status (1 alive, 3 left, 4 failed) as ``host``'s agent sees it."""
        try:
            found = self.consul_get("/v1/agent/members", host)
        except (OSError, ValueError):
            return {}
        assert isinstance(found, list)
        return {m["Name"]: int(m["Status"]) for m in found}

    def wait_members(self, timeout: float) -> float:
        want = {f"host-{h}" for h in HOSTS}
        return wait_until(
            "every Consul agent is an alive member",
            lambda: {n for n, st in self.members().items() if st == 1} >= want,
            timeout,
        )

    def catalog(self, service: str, passing: bool = False) -> list[dict[str, object]]:
        """Consul's health entries of ``service`` (from A's server)."""
        path = f"/v1/health/service/{service}" + ("?passing=1" if passing else "")
        found = self.consul_get(path)
        assert isinstance(found, list)
        return found

    def passing(self, name: str) -> bool:
        s = self.services[name]
        try:
            entries = self.catalog(SERVICE_OF_ROLE[s.role], passing=True)
        except (OSError, ValueError):
            return False
        return any(
            e["Service"]["Address"] == self.net.address(s.host)  # type: ignore[index]
            and e["Service"]["Port"] == s.port  # type: ignore[index]
            for e in entries
        )

    def health(self, name: str) -> int:
        with grpc.insecure_channel(self.local(name)) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        return int(reply.status)

    def wait_serving(self, name: str, timeout: float = STARTUP_TIMEOUT_S) -> float:
        s = self.services[name]

        def serving() -> bool:
            assert s.proc is not None and s.proc.alive, (
                f"{name} exited while starting:\n{s.proc.log[-3000:] if s.proc else ''}"
            )
            if s.role == "gateway":
                return self._gateway_health()
            try:
                return self.health(name) == health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                return False

        return wait_until(f"{name} serves", serving, timeout)

    def _gateway_health(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.gateway_url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.HTTPError, OSError):
            return False

    def router_workers(self, router: str) -> dict[str, bool]:
        """Worker address -> healthy, as ``router`` lists them ({} when it does not answer)."""
        from pdmesh.v1 import router_pb2, router_pb2_grpc

        try:
            with grpc.insecure_channel(self.local(router)) as channel:
                reply = router_pb2_grpc.RouterServiceStub(channel).ListWorkers(
                    router_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT_S
                )
        except grpc.RpcError:
            return {}
        return {w.address: w.healthy for w in reply.workers}

    def routes_to(self, router: str, worker: str) -> bool:
        return self.router_workers(router).get(self.services[worker].address, False)

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Until each router lists both workers healthy and a completion through the gateway
        returns."""
        start = time.monotonic()
        pairs = [
            (r.name, w.name) for r in self.of_role("router") for w in self.of_role(*WORKER_ROLES)
        ]
        for router, worker in pairs:
            wait_until(
                f"{router} routes to {worker}",
                lambda router=router, worker=worker: self.routes_to(router, worker),  # type: ignore[misc]
                timeout,
            )
        wait_until("a completion through the gateway", self.probe_gateway, timeout)
        return time.monotonic() - start

    def model_name(self) -> str:
        with urllib.request.urlopen(f"{self.gateway_url}/v1/models", timeout=RPC_TIMEOUT_S) as r:
            return str(json.load(r)["data"][0]["id"])

    def probe_gateway(self) -> bool:
        try:
            body = {"model": self.model_name(), "prompt": "Hi", "max_tokens": 1}
            request = urllib.request.Request(
                f"{self.gateway_url}/v1/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=RPC_TIMEOUT_S * 2) as response:
                return bool(json.load(response)["choices"])
        except (OSError, ValueError, KeyError, IndexError):
            return False

    def load_of(self, name: str) -> object:
        from pdmesh.v1 import worker_pb2, worker_pb2_grpc

        with grpc.insecure_channel(self.local(name)) as channel:
            return worker_pb2_grpc.WorkerServiceStub(channel).GetLoad(
                worker_pb2.GetLoadRequest(), timeout=RPC_TIMEOUT_S
            )

    def pages_held(self, within: float) -> dict[str, int]:
        """Per live worker: KV pages held plus requests and rooms open, once all are 0 or
        ``within`` seconds passed."""
        deadline = time.monotonic() + within
        while True:
            held = {
                s.name: _held(self.load_of(s.name)) for s in self.of_role(*WORKER_ROLES) if s.alive
            }
            if not any(held.values()) or time.monotonic() > deadline:
                return held
            time.sleep(POLL_S * 2)

    def processes(self) -> Iterator[tuple[str, HostProc]]:
        for s in self.services.values():
            if s.proc is not None:
                yield s.name, s.proc
        yield from ((f"consul-{h}", p) for h, p in self.agents.items())


def _held(load: object) -> int:
    pages = load.num_total_pages - load.num_free_pages  # type: ignore[attr-defined]
    return int(pages + load.num_running + load.num_waiting + load.num_rooms)  # type: ignore[attr-defined]


def _listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def _local(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"{host}:{port}"
