"""``python -m services.launch``: the whole mesh on one host, with one command.

``--mode agg`` (default) starts tokenizer + worker + router + gateway; ``--mode disagg`` starts
tokenizer + prefill worker + decode worker + router (in PD mode) + gateway, with KV moved by
``--kv-transfer-backend``. The children run on loopback; the launcher waits until each answers
its health check (with a deadline), prints the URL and a curl example, and on Ctrl-C or SIGTERM
stops them in reverse order (SIGTERM, then SIGKILL after the grace period). If any child dies,
the rest are stopped and the launcher exits non-zero with the dead one's name. The ``--tls-*``
flags go to every service (each serves and dials with them) and secure the health probes.
"""

from __future__ import annotations

import argparse
import logging
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig

log = logging.getLogger("services.launch")


MODES = ("agg", "disagg")
# pdmesh.kv_transfer's backend names (not imported here: it loads torch)
KV_BACKENDS = ("auto", "mooncake", "grpc", "cuda_ipc")
DEFAULT_MODEL = "smollm2-135m-instruct"
# what "auto" picks for the default model: its own template ignores tools, so the built-in
# one adds them in the Hermes <tool_call> form, which qwen25 parses (other models: their own
# template and no parser unless given)
DEFAULT_MODEL_CHAT_TEMPLATE = "smollm2-tools"
DEFAULT_MODEL_TOOL_CALL_PARSER = "qwen25"
AUTO = "auto"


@dataclass(frozen=True)
class LauncherConfig:
    mode: str = flag(
        "agg",
        "'agg': one aggregated worker; 'disagg': PD disaggregation with one prefill worker and "
        "one decode worker (the router sends each prompt's prefill to the first and streams "
        "from the second)",
    )
    model: str = flag(DEFAULT_MODEL, "model spec served by the workers and tokenizer")
    host: str = flag("127.0.0.1", "address every service binds to (loopback by default)")
    gateway_port: int = flag(8000, "HTTP port of the OpenAI-compatible gateway")
    router_port: int = flag(
        50051, "gRPC port of the router (with --routers N, the others take the next free ports)"
    )
    routers: int = flag(
        1,
        "router processes; the gateway spreads requests over them round-robin, each keeps its "
        "own cache-aware tree (as SMG / llm-d replicas do). More than one when a single router "
        "process is CPU-bound (its CPU near 100%% of a core under load)",
    )
    gateway_workers: int = flag(
        1,
        "gateway processes serving --gateway-port together (the gateway's --workers); more "
        "than one when the gateway process is CPU-bound",
    )
    tokenizer_port: int = flag(50052, "gRPC port of the tokenizer service")
    worker_port: int = flag(50053, "gRPC port of the aggregated worker (disagg: the decode worker)")
    prefill_port: int = flag(50054, "disagg: gRPC port of the prefill worker")
    bootstrap_port: int = flag(8998, "disagg: port of the prefill worker's bootstrap server")
    kv_transfer_backend: str = flag(
        "auto",
        f"disagg: how KV moves from prefill to decode: {', '.join(KV_BACKENDS)} (auto: cuda_ipc "
        "between GPUs of one host, else mooncake)",
    )
    chat_template: str = flag(
        AUTO,
        "the tokenizer's --chat-template (a Jinja file or built-in name; empty: the model's "
        f"own); auto: {DEFAULT_MODEL_CHAT_TEMPLATE} for {DEFAULT_MODEL}, else the model's own",
    )
    tool_call_parser: str = flag(
        AUTO,
        "the routers' --tool-call-parser (tool_choice auto); empty: none; auto: "
        f"{DEFAULT_MODEL_TOOL_CALL_PARSER} for {DEFAULT_MODEL}, else none",
    )
    reasoning_parser: str = flag(
        "", "the routers' --reasoning-parser (deepseek-r1, qwen3); empty: none"
    )
    startup_timeout: float = flag(600.0, "seconds to wait for every service to become healthy")
    grace_period: float = flag(10.0, "seconds each service may drain on shutdown before SIGKILL")

    def __post_init__(self) -> None:
        for name in ("routers", "gateway_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.mode not in MODES:
            raise ValueError(f"--mode={self.mode!r}; choose {', '.join(MODES)}")
        if self.kv_transfer_backend not in KV_BACKENDS:
            raise ValueError(
                f"--kv-transfer-backend={self.kv_transfer_backend!r}; choose "
                f"{', '.join(KV_BACKENDS)}"
            )


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    health: str  # "grpc://host:port" or "http://host:port/health"


def main(argv: list[str] | None = None) -> int:
    cfg, tls, worker_extra = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s launcher %(message)s")
    if cfg.model == DEFAULT_MODEL:
        from pdmesh.models.fetch import ensure_default_model

        ensure_default_model()  # once here, with a progress bar, before two services want it
    children: list[Child] = []
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        deadline = time.monotonic() + cfg.startup_timeout
        # in dependency order: the router's first health checks must find the worker up, and
        # the gateway's /health means the router answers
        for stage in plan(cfg, worker_extra, tls):
            started = [spawn(*service) for service in stage]
            children += started
            wait_healthy(started, deadline, lambda: stopping, tls)
        if not stopping:
            announce(cfg)
        while not stopping:
            dead = [c for c in children if c.proc.poll() is not None]
            if dead:
                log.error("%s exited with %s; stopping the mesh", dead[0].name, dead[0].proc.poll())
                return 1
            time.sleep(0.5)
        return 0
    except (TimeoutError, RuntimeError) as e:
        log.error("%s", e)
        return 1
    finally:
        stop_all(children, cfg.grace_period)


def parse_args(argv: list[str] | None) -> tuple[LauncherConfig, TLSConfig, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    parser = argparse.ArgumentParser(
        prog="python -m services.launch",
        description="Start tokenizer + worker + router + gateway on this host (--mode disagg: "
        "a prefill and a decode worker instead of the one worker). Flags after '--' go to every "
        "worker (python -m services.decode --help lists them, e.g. -- --num-pages 512 "
        "--max-running-requests 16).",
    )
    add_dataclass_args(parser, LauncherConfig)
    tls = parser.add_argument_group("TLS (passed to every service; secures the health probes)")
    # argument groups share add_argument with the parser, which is all add_dataclass_args uses
    add_dataclass_args(cast(argparse.ArgumentParser, tls), TLSConfig)
    try:
        args = parser.parse_args(argv)
        return from_args(LauncherConfig, args), from_args(TLSConfig, args), extra
    except ValueError as e:
        parser.error(str(e))


Service = tuple[str, str, list[str], str]  # name, module, args, health target


def plan(
    cfg: LauncherConfig, worker_extra: list[str], tls: TLSConfig = PLAINTEXT
) -> list[list[Service]]:
    """Stages started one after another; the services of a stage start together."""
    h = cfg.host
    common = ["--host", h, "--grace-period", str(cfg.grace_period), *tls.flags()]
    tok, wrk, pre = (f"{h}:{p}" for p in (cfg.tokenizer_port, cfg.worker_port, cfg.prefill_port))
    model = ["--model", cfg.model]
    tokenizer: Service = (
        "tokenizer", "services.tokenizer",
        [*common, "--port", str(cfg.tokenizer_port), *model, *template_flags(cfg)],
        f"grpc://{tok}",
    )  # fmt: skip
    if cfg.mode == "agg":
        workers: list[Service] = [
            ("worker", "services.decode",
             [*common, "--port", str(cfg.worker_port), *model, *worker_extra], f"grpc://{wrk}"),
        ]  # fmt: skip
        routing = ["--workers", wrk]
    else:
        kv = ["--kv-transfer-backend", cfg.kv_transfer_backend]
        workers = [
            ("prefill", "services.prefill",
             [*common, "--port", str(cfg.prefill_port), "--bootstrap-port",
              str(cfg.bootstrap_port), *kv, *model, *worker_extra], f"grpc://{pre}"),
            ("decode", "services.decode",
             [*common, "--port", str(cfg.worker_port), "--mode", "decode", *kv, *model,
              *worker_extra], f"grpc://{wrk}"),
        ]  # fmt: skip
        routing = ["--prefill-workers", pre, "--decode-workers", wrk]
    ports = router_ports(cfg)
    routers: list[Service] = [
        (f"router-{i}" if len(ports) > 1 else "router", "services.router",
         [*common, "--port", str(port), *routing, "--tokenizer", tok, *parser_flags(cfg)],
         f"grpc://{h}:{port}")
        for i, port in enumerate(ports)
    ]  # fmt: skip
    routers_csv = ",".join(f"{h}:{port}" for port in ports)
    gateway = ["--host", h, "--port", str(cfg.gateway_port), "--router", routers_csv, *tls.flags()]
    if cfg.gateway_workers > 1:
        gateway += ["--workers", str(cfg.gateway_workers)]
    return [
        [tokenizer, *workers],
        routers,
        [("gateway", "services.gateway", gateway, f"http://{h}:{cfg.gateway_port}/health")],
    ]  # fmt: skip


def template_flags(cfg: LauncherConfig) -> list[str]:
    """The tokenizer's --chat-template, with auto resolved."""
    spec = cfg.chat_template
    if spec == AUTO:
        spec = DEFAULT_MODEL_CHAT_TEMPLATE if cfg.model == DEFAULT_MODEL else ""
    return ["--chat-template", spec] if spec else []


def parser_flags(cfg: LauncherConfig) -> list[str]:
    """The routers' --tool-call-parser and --reasoning-parser, with auto resolved."""
    tools = cfg.tool_call_parser
    if tools == AUTO:
        tools = DEFAULT_MODEL_TOOL_CALL_PARSER if cfg.model == DEFAULT_MODEL else ""
    flags = ["--tool-call-parser", tools] if tools else []
    return flags + (["--reasoning-parser", cfg.reasoning_parser] if cfg.reasoning_parser else [])


def router_ports(cfg: LauncherConfig) -> list[int]:
    """--router-port, then the next ports no other service of the launcher uses."""
    taken = {cfg.tokenizer_port, cfg.worker_port, cfg.prefill_port, cfg.bootstrap_port}
    taken.add(cfg.gateway_port)
    ports = [cfg.router_port]
    candidate = cfg.router_port
    while len(ports) < cfg.routers:
        candidate += 1
        if candidate not in taken:
            ports.append(candidate)
    return ports


def spawn(name: str, module: str, args: list[str], health: str) -> Child:
    log.info("starting %s: python -m %s %s", name, module, " ".join(args))
    # own process group: a terminal's Ctrl-C reaches only the launcher, which stops them in order
    proc = subprocess.Popen([sys.executable, "-m", module, *args], start_new_session=True)
    return Child(name, proc, health)


def wait_healthy(
    children: list[Child],
    deadline: float,
    cancelled: Callable[[], bool],
    tls: TLSConfig = PLAINTEXT,
) -> None:
    pending = list(children)
    while pending:
        if cancelled():
            return
        for c in list(pending):
            if c.proc.poll() is not None:
                raise RuntimeError(f"{c.name} exited with {c.proc.returncode} during startup")
            if is_healthy(c.health, tls):
                log.info("%s is healthy", c.name)
                pending.remove(c)
        if time.monotonic() > deadline:
            names = ", ".join(c.name for c in pending)
            raise TimeoutError(f"not healthy within --startup-timeout: {names}")
        time.sleep(0.5)


def is_healthy(target: str, tls: TLSConfig = PLAINTEXT) -> bool:
    """Whether ``target`` (``http://…`` or ``grpc://host:port``, dialed with ``tls``) says it
    is serving."""
    try:
        if target.startswith("http"):
            with urllib.request.urlopen(target, timeout=2) as resp:
                return bool(resp.status == 200)
        with tls.sync_channel(target.removeprefix("grpc://")) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)
    except Exception:  # not up yet: refused, unavailable, deadline
        return False


def announce(cfg: LauncherConfig) -> None:
    url = f"http://{cfg.host}:{cfg.gateway_port}"
    print(
        f"\npdmesh is up: {url}/v1  (model {cfg.model}, {cfg.mode}; Ctrl-C stops it)\n\n"
        f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d "
        f'\'{{"model": "{cfg.model}", "messages": [{{"role": "user", '
        f'"content": "What is the capital of France?"}}], "max_tokens": 32}}\'\n',
        flush=True,
    )


def stop_all(children: list[Child], grace: float) -> None:
    for c in reversed(children):  # gateway first: no new requests while the rest drain
        if c.proc.poll() is None:
            c.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace + 5
    for c in reversed(children):
        try:
            c.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", c.name)
            c.proc.kill()
            c.proc.wait()
        log.info("%s stopped (exit %s)", c.name, c.proc.returncode)


if __name__ == "__main__":
    raise SystemExit(main())
