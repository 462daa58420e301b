"""The processes of ``python -m benchmarks mesh``: one worker (the stepping worker or the real
``services.decode``) and, for the arms asked for, the real tokenizer, router and gateway in front
of it, and smg beside them; each on a free loopback port, in a ``Fleet``.

The router runs with its admission limits lifted (``--max-concurrent-requests 0``): the
benchmark sets the concurrency, and a router queue at its default 256 would turn a higher level
into queued or refused requests rather than a measure of the path.
"""

from __future__ import annotations

import importlib.util
import logging
import time
from dataclasses import dataclass, field

import grpc

from benchmarks.mesh.config import DIRECT, GATEWAY, ROUTER_IDS, ROUTER_TEXT, SMG, MeshBenchConfig
from benchmarks.routers.fleet import Child, ChildDied, Fleet, free_port
from benchmarks.smg_procs import start_smg, start_tokenizer, wait_ready
from pdmesh.models.source import resolve
from pdmesh.v1 import router_pb2, router_pb2_grpc

log = logging.getLogger(__name__)

WORKER, TOKENIZER, ROUTER, GATEWAY_PROC, SMG_PROC = (
    "worker",
    "tokenizer",
    "router",
    "gateway",
    "smg",
)
# the processes a token crosses in each arm, worker first
PATHS = {
    DIRECT: (WORKER,),
    ROUTER_IDS: (WORKER, ROUTER),
    ROUTER_TEXT: (WORKER, ROUTER, TOKENIZER),
    GATEWAY: (WORKER, ROUTER, TOKENIZER, GATEWAY_PROC),
    SMG: (WORKER, SMG_PROC),
}
TEXT_ARMS = (ROUTER_TEXT, GATEWAY, SMG)
SMG_STARTUP_S = 90.0  # smg gets less than --startup-timeout: a failed start only skips its arm
# the real worker's context: the prompt, the output and room for a chat template's markers
CHAT_TEMPLATE_TOKENS = 64
POLL_S = 0.2
RPC_TIMEOUT_S = 5.0


@dataclass
class Mesh:
    """Where each arm sends its requests, every process's pid, and the arms that cannot run."""

    targets: dict[str, str] = field(default_factory=dict)  # arm -> host:port or base URL
    pids: dict[str, int] = field(default_factory=dict)  # process name -> pid
    skipped: dict[str, str] = field(default_factory=dict)  # arm -> why


def start_mesh(cfg: MeshBenchConfig, fleet: Fleet) -> Mesh:
    """Every process the asked-for arms need, healthy and ready to route on return."""
    mesh = Mesh()
    arms = cfg.arm_list()
    if resolve(cfg.model).path is None:  # random weights: no tokenizer files anywhere
        for arm in (a for a in arms if a in TEXT_ARMS):
            mesh.skipped[arm] = f"--model {cfg.model} has no tokenizer (random weights)"
    if SMG in arms and SMG not in mesh.skipped and importlib.util.find_spec("smg") is None:
        mesh.skipped[SMG] = "smg is not installed (pip install -e '.[dev]': smg==1.13.0)"
    runnable = [a for a in arms if a not in mesh.skipped]
    worker = start_worker(cfg, fleet)
    mesh.pids[WORKER] = worker.proc.pid
    address = worker.health.removeprefix("grpc://")
    mesh.targets[DIRECT] = address
    if any(a in (ROUTER_IDS, ROUTER_TEXT, GATEWAY) for a in runnable):
        _start_pdmesh(cfg, fleet, mesh, address, runnable)
    if SMG in runnable:
        _start_smg(cfg, fleet, mesh, address)
    return mesh


def start_worker(cfg: MeshBenchConfig, fleet: Fleet) -> Child:
    """The worker every arm ends at, healthy on return."""
    port = free_port()
    most = max(cfg.levels())
    if cfg.worker == "stepping":
        args = [
            "-m", "benchmarks.mesh.stepping_worker", "--port", str(port),
            "--model", cfg.model, "--step-ms", str(cfg.step_ms),
            "--max-running-requests", str(max(1024, 2 * most)),
        ]  # fmt: skip
    else:
        context = cfg.prompt_len + cfg.output_len + CHAT_TEMPLATE_TOKENS
        pages = most * -(-context // 16) + 1  # 16: the engine's default page size
        args = [
            "-m", "services.decode", "--port", str(port), "--model", cfg.model,
            "--device", cfg.device, "--max-running-requests", str(most),
            "--num-pages", str(pages), "--max-model-len", str(context),
            # every arm cycles through a pool of prompts: a prefix cache would serve repeats
            "--no-enable-prefix-cache", *cfg.worker_args.split(),
        ]  # fmt: skip
    args += ["--log-level", "warning", "--grace-period", "2"]
    child = fleet.start(WORKER, args, f"grpc://127.0.0.1:{port}")
    fleet.wait_healthy([child])
    return child


def _start_pdmesh(
    cfg: MeshBenchConfig, fleet: Fleet, mesh: Mesh, worker: str, arms: list[str]
) -> None:
    text = any(a in (ROUTER_TEXT, GATEWAY) for a in arms)
    # token ids with detokenize=false never reach a tokenizer: without a text arm nobody
    # listens at the address the router is given
    tokenizer = start_tokenizer(fleet, cfg.model) if text else f"127.0.0.1:{free_port()}"
    if text:
        # up before the router starts: a router whose first connection attempt was refused
        # waits out gRPC's reconnect backoff and fails text requests meanwhile
        fleet.wait_healthy()
        mesh.pids[TOKENIZER] = next(c.proc.pid for c in fleet.children if c.name == TOKENIZER)
    router_port = free_port()
    router = fleet.start(
        ROUTER,
        [
            "-m", "services.router", "--port", str(router_port), "--workers", worker,
            "--tokenizer", tokenizer, "--max-concurrent-requests", "0",
            "--log-level", "warning", "--grace-period", "2",
        ],
        f"grpc://127.0.0.1:{router_port}",
    )  # fmt: skip
    mesh.pids[ROUTER] = router.proc.pid
    router_address = f"127.0.0.1:{router_port}"
    mesh.targets[ROUTER_IDS] = mesh.targets[ROUTER_TEXT] = router_address
    if GATEWAY in arms:
        gateway_port = free_port()
        gateway = fleet.start(
            GATEWAY_PROC,
            [
                "-m", "services.gateway", "--port", str(gateway_port),
                "--router", router_address, "--log-level", "warning", "--grace-period", "2",
            ],
            f"http://127.0.0.1:{gateway_port}/health",
        )  # fmt: skip
        mesh.pids[GATEWAY_PROC] = gateway.proc.pid
        mesh.targets[GATEWAY] = f"http://127.0.0.1:{gateway_port}"
    fleet.wait_healthy()
    wait_router_ready(fleet, router, router_address)


def wait_router_ready(fleet: Fleet, router: Child, address: str) -> None:
    """Until the router lists its worker healthy (it health-checks workers on its own
    schedule: a request sent before would find no worker)."""
    deadline = time.monotonic() + fleet.startup_timeout
    seen = ""
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        while True:
            router.check_alive()
            try:
                reply = stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=RPC_TIMEOUT_S)
                if reply.workers and all(w.healthy for w in reply.workers):
                    return
                seen = str(list(reply.workers))
            except grpc.RpcError as e:
                seen = str(e)
            if time.monotonic() > deadline:
                raise ChildDied(f"the router at {address} lists no healthy worker: {seen}")
            time.sleep(POLL_S)


def _start_smg(cfg: MeshBenchConfig, fleet: Fleet, mesh: Mesh, worker: str) -> None:
    """smg in gRPC mode in front of the worker; its arm is skipped when it does not start."""
    url, children = start_smg(
        fleet, cfg.model, [worker], "round_robin", extra_args=cfg.smg_args.split()
    )
    patience, fleet.startup_timeout = fleet.startup_timeout, SMG_STARTUP_S
    try:
        wait_ready(fleet, url, children, 1)
    except ChildDied as e:
        fleet.stop_children(children)
        first = str(e).splitlines()[0]
        mesh.skipped[SMG] = f"smg did not become ready ({first}); its log: {fleet.log_dir}"
        log.warning("skipping the smg arm: %s", e)
        return
    finally:
        fleet.startup_timeout = patience
    mesh.pids[SMG_PROC] = children[0].proc.pid
    mesh.targets[SMG] = url
