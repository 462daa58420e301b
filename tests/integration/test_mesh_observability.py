"""The whole mesh with ``--discovery consul``, traces exported over OTLP and ``/metrics`` on:
a real ``consul agent -dev``, every service a real process, an in-process OTLP/gRPC receiver,
and Debian's Prometheus scraping through ``python -m pdmesh.telemetry.http_sd``.

The module starts one mesh — tokenizer, router (with no workers), gateway, then a prefill and
a decode worker — and the tests run against it in order:

1. the router picks workers up as they register (2 prefill + 2 decode), a new prefill gets
   traffic, ``kill -9`` of a decode removes it within the check interval + 2 s while requests
   keep succeeding, and a graceful stop deregisters at once;
2. one request through the gateway is one trace with spans from all five services, each parented
   on the span that called it;
3. Prometheus scrapes every service, found through the discovery endpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from pdmesh.discovery import GATEWAY, PREFILL, ROUTER, TOKENIZER, WORKER
from pdmesh.discovery.dev_agent import ConsulDevAgent, free_port
from pdmesh.v1 import router_pb2, router_pb2_grpc
from tests.integration.procs import REPO_ROOT, ServiceProc, worker_args

CHECK_INTERVAL_S = 1.0  # Consul's gRPC/HTTP checks of every instance
HEALTH_CHECK_S = 1.0  # the router's own checks of its workers
WAIT_S = 30.0
TRACE_ID = "5bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "10f067aa0ba902b7"
PROMETHEUS = shutil.which("prometheus")
PROMPT = "The capital of France is"
SMALL = ("--max-num-batched-tokens", "128")


# -- an OTLP/gRPC receiver --------------------------------------------------------------------


@dataclass
class Span:
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    attributes: dict[str, Any]
    events: list[str]


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self._lock = threading.Lock()

    def Export(  # noqa: N802 (the proto's name)
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for s in scope.spans:
                        self.spans.append(
                            Span(
                                resource.get("service.name", ""),
                                s.trace_id.hex(),
                                s.span_id.hex(),
                                s.parent_span_id.hex(),
                                s.name,
                                {a.key: _value(a.value) for a in s.attributes},
                                [e.name for e in s.events],
                            )
                        )
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


# -- the mesh ---------------------------------------------------------------------------------


@dataclass
class Mesh:
    agent: ConsulDevAgent
    receiver: Receiver
    log_dir: Path
    tokenizer: ServiceProc
    router: ServiceProc
    gateway: ServiceProc
    workers_at_start: list[str]
    prefill: ServiceProc | None = None
    decode: ServiceProc | None = None
    extra: list[ServiceProc] = field(default_factory=list)

    def consul_args(self) -> list[str]:
        return [
            "--discovery", "consul", "--consul-addr", self.agent.http_addr,
            "--consul-check-interval", str(CHECK_INTERVAL_S), "--metrics-port", "0",
        ]  # fmt: skip

    def worker(self, kind: str, name: str) -> ServiceProc:
        """A prefill or decode worker process (not yet waited for)."""
        if kind == "prefill":
            module = "services.prefill"
            args = worker_args("--bootstrap-port", "0", "--kv-transfer-backend", "grpc", *SMALL)
        else:
            module = "services.decode"
            args = worker_args("--mode", "decode", "--kv-transfer-backend", "grpc", *SMALL)
        args += ["--grace-period", "2", *self.consul_args()]
        proc = ServiceProc(module, args, name, free_port(), self.log_dir)
        self.extra.append(proc)
        return proc

    def workers(self) -> dict[str, router_pb2.Worker]:
        """The router's workers by address."""
        with grpc.insecure_channel(self.router.address) as channel:
            reply = router_pb2_grpc.RouterServiceStub(channel).ListWorkers(
                router_pb2.ListWorkersRequest(), timeout=5
            )
        return {w.address: w for w in reply.workers}

    def healthy(self) -> set[str]:
        return {a for a, w in self.workers().items() if w.healthy}

    def generate(self, max_new_tokens: int = 4) -> router_pb2.RouterGenerateResponse:
        """One request through the router; its last message."""
        request = router_pb2.RouterGenerateRequest(text=PROMPT)
        request.sampling_params.max_new_tokens = max_new_tokens
        request.sampling_params.temperature = 0.0
        with grpc.insecure_channel(self.router.address) as channel:
            replies = list(router_pb2_grpc.RouterServiceStub(channel).Generate(request, timeout=60))
        assert replies
        return replies[-1]

    def catalog_meta(self, proc: ServiceProc) -> dict[str, str]:
        services = self.agent.get("/v1/agent/services")
        assert isinstance(services, dict)
        for service in services.values():
            if service["Port"] == proc.port:
                return dict(service["Meta"])
        raise AssertionError(f"{proc.name} is not in the catalog: {services}")


def wait_until(what: str, predicate: Callable[[], bool], timeout: float = WAIT_S) -> float:
    """Seconds until ``predicate`` held (polled every 50 ms)."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def start_gateway(args: list[str], log_dir: Path) -> ServiceProc:
    svc = ServiceProc("services.gateway", args, "gateway", free_port(), log_dir)

    def answers() -> bool:
        assert svc.proc.poll() is None, svc.log
        try:
            urllib.request.urlopen(f"http://{svc.address}/health", timeout=2).close()
        except urllib.error.HTTPError:
            return True  # 503 until a router is found: it is up
        except OSError:
            return False
        return True

    wait_until("the gateway answers", answers, 60)
    return svc


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    log_dir = tmp_path_factory.mktemp("mesh")
    receiver = Receiver()
    otlp = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, otlp)
    otlp_port = otlp.add_insecure_port("127.0.0.1:0")
    otlp.start()
    saved = dict(os.environ)
    # the children inherit these: tracing on, exported in batches every 100 ms
    os.environ.update(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{otlp_port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    procs: list[ServiceProc] = []
    try:
        with ConsulDevAgent() as agent:
            consul = [
                "--discovery", "consul", "--consul-addr", agent.http_addr,
                "--consul-check-interval", str(CHECK_INTERVAL_S),
            ]  # fmt: skip
            grpc_consul = [*consul, "--metrics-port", "0"]
            tokenizer = ServiceProc(
                "services.tokenizer", ["--grace-period", "1", *grpc_consul], "tokenizer",
                free_port(), log_dir,
            )  # fmt: skip
            router = ServiceProc(
                "services.router",
                ["--grace-period", "1", "--health-check-interval", str(HEALTH_CHECK_S),
                 *grpc_consul],
                "router", free_port(), log_dir,
            )  # fmt: skip
            procs += [tokenizer, router]
            for p in procs:
                p.wait_until_serving()
            gateway = start_gateway(["--grace-period", "1", *consul], log_dir)
            procs.append(gateway)
            m = Mesh(agent, receiver, log_dir, tokenizer, router, gateway, [])
            m.workers_at_start = list(m.workers())
            m.prefill, m.decode = m.worker("prefill", "prefill-1"), m.worker("decode", "decode-1")
            for p in (m.prefill, m.decode):
                p.wait_until_serving()
            yield m
            for p in [*reversed(m.extra), *reversed(procs)]:
                p.stop()
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.kill()
        os.environ.clear()
        os.environ.update(saved)
        otlp.stop(0)


# -- 1. workers come and go --------------------------------------------------------------------


def test_router_follows_workers_as_they_come_and_go(mesh: Mesh) -> None:
    assert mesh.workers_at_start == [], "the router started with no workers"
    assert mesh.prefill is not None and mesh.decode is not None
    first = {mesh.prefill.address, mesh.decode.address}
    wait_until("the first pair is healthy in the router", lambda: first <= mesh.healthy())
    assert mesh.generate().finish_reason != 0

    # a second pair joins while the router runs
    prefill2, decode2 = mesh.worker("prefill", "prefill-2"), mesh.worker("decode", "decode-2")
    for p in (prefill2, decode2):
        p.wait_until_serving()
    every = first | {prefill2.address, decode2.address}
    wait_until("all four workers are healthy in the router", lambda: every <= mesh.healthy())
    role_enum = router_pb2.Worker.DESCRIPTOR.fields_by_name["role"].enum_type
    roles = [role_enum.values_by_number[w.role].name for w in mesh.workers().values()]
    assert sorted(r.rsplit("_", 1)[-1] for r in roles) == ["DECODE"] * 2 + ["PREFILL"] * 2, roles

    # the new prefill takes its share of the traffic (round-robin over two prefills)
    deciders = {mesh.generate().worker_id for _ in range(4)}
    assert len(deciders) == 2, f"both decode workers stream: {deciders}"
    meta = mesh.catalog_meta(prefill2)
    assert meta["bootstrap_port"] and meta["kv_transfer"] == "grpc"
    scraped = urllib.request.urlopen(
        f"http://127.0.0.1:{meta['metrics_port']}/metrics", timeout=5
    ).read()
    generate_line = [
        line
        for line in scraped.decode().splitlines()
        if line.startswith("pdmesh_requests_total") and "WorkerService/Generate" in line
    ]
    assert generate_line and float(generate_line[0].split()[-1]) >= 1, generate_line

    # kill -9 a decode worker while requests keep coming. It dies between two requests: one
    # it was streaming would fail with it (there is no migration); the ones after must not
    results: list[str] = []
    stop = threading.Event()
    between_requests = threading.Lock()

    def load() -> None:
        while not stop.is_set():
            with between_requests:
                try:
                    mesh.generate(max_new_tokens=2)
                    results.append("ok")
                except grpc.RpcError as e:
                    results.append(f"{e.code().name}: {e.details()}")

    traffic = threading.Thread(target=load)
    traffic.start()
    try:
        time.sleep(0.5)
        with between_requests:
            decode2.kill()
            killed_after = len(results)
        gone = wait_until(
            "the killed decode leaves the router", lambda: decode2.address not in mesh.workers()
        )
        time.sleep(1.0)  # and requests go on without it
    finally:
        stop.set()
        traffic.join(timeout=60)
    assert gone <= CHECK_INTERVAL_S + 2.0, f"removed after {gone:.1f}s"
    assert len(results) > killed_after > 0, results
    assert all(r == "ok" for r in results), results

    # a graceful stop deregisters at once, before the worker drains
    prefill2.proc.send_signal(15)
    gone = wait_until(
        "the stopped prefill leaves the router", lambda: prefill2.address not in mesh.workers()
    )
    assert gone < 1.0, f"removed {gone:.2f}s after SIGTERM"
    # (stop() would signal again, and a second SIGTERM during shutdown is not handled)
    assert prefill2.proc.wait(timeout=30) == 0, prefill2.log
    assert mesh.generate().finish_reason != 0  # the first pair carries on


# -- 2. one trace across the five services ----------------------------------------------------


def test_one_request_is_one_trace_across_all_services(mesh: Mesh) -> None:
    assert mesh.prefill is not None and mesh.decode is not None
    first = {mesh.prefill.address, mesh.decode.address}
    wait_until("the first pair is healthy", lambda: first <= mesh.healthy())
    wait_until("the gateway found the router", lambda: _status(mesh.gateway) == 200)
    body = json.dumps({"text": PROMPT, "sampling_params": {"max_new_tokens": 4}}).encode()
    request = urllib.request.Request(
        f"http://{mesh.gateway.address}/generate",
        data=body,
        headers={
            "Content-Type": "application/json",
            "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN_ID}-01",
        },
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200

    services = {"pdmesh-gateway", "pdmesh-router", "pdmesh-tokenizer"}
    services |= {"pdmesh-prefill", "pdmesh-decode"}

    def complete() -> bool:
        spans = mesh.receiver.of_trace(TRACE_ID)
        ids = {s.span_id for s in spans} | {CALLER_SPAN_ID}
        # every span's parent arrived too (a span is exported when it ends)
        return {s.service for s in spans} == services and all(s.parent_id in ids for s in spans)

    wait_until("spans from all five services", complete, 15)
    spans = mesh.receiver.of_trace(TRACE_ID)
    by_id = {s.span_id: s for s in spans}

    def one(service: str, name: str) -> Span:
        found = [s for s in spans if s.service == service and s.name == name]
        assert len(found) == 1, f"{service} {name}: {found}\nall: {spans}"
        return found[0]

    def parent(span: Span) -> Span:
        assert span.parent_id in by_id, f"parent of {span} not in the trace"
        return by_id[span.parent_id]

    http = one("pdmesh-gateway", "POST /generate")
    assert http.parent_id == CALLER_SPAN_ID
    generate = "/pdmesh.v1.RouterService/Generate"
    gw_call = one("pdmesh-gateway", generate)
    router_server = one("pdmesh-router", generate)
    assert parent(gw_call) is http and parent(router_server) is gw_call
    assert "first_token" in router_server.events

    tokenize = one("pdmesh-router", "tokenize")
    assert parent(tokenize) is router_server and tokenize.attributes["pdmesh.prompt_tokens"] > 0
    tokenizer_side = [s for s in spans if s.service == "pdmesh-tokenizer"]
    assert tokenizer_side, "the tokenizer served its part"
    for server in tokenizer_side:
        client = parent(server)
        assert client.service == "pdmesh-router" and client.name == server.name
        assert parent(client) in (tokenize, router_server)  # Tokenize / GetTokenizerFiles

    route = one("pdmesh-router", "route")
    assert parent(route) is router_server
    assert route.attributes["pdmesh.policy"] == "round_robin"
    assert route.attributes["pdmesh.prefill"] and route.attributes["pdmesh.decode"]
    worker_generate = "/pdmesh.v1.WorkerService/Generate"
    server = one("pdmesh-prefill", worker_generate)  # the prefill half: its own Generate call
    client = parent(server)
    assert (client.service, client.name) == ("pdmesh-router", worker_generate)
    assert parent(client) is route
    assert parent(one("pdmesh-prefill", "prefill")) is server
    # the decode half travels on the router's shared WorkerService.Stream to that worker, its
    # trace context in the message: the decode span continues the route span directly
    assert parent(one("pdmesh-decode", "decode")) is route
    prefill = one("pdmesh-prefill", "prefill")
    assert prefill.attributes["pdmesh.prompt_tokens"] == tokenize.attributes["pdmesh.prompt_tokens"]
    assert "pdmesh.cached_tokens" in prefill.attributes
    transfer = one("pdmesh-prefill", "kv_transfer")
    assert parent(transfer) is one("pdmesh-prefill", worker_generate)
    assert transfer.attributes["pdmesh.bytes"] > 0 and transfer.attributes["pdmesh.pages"] > 0
    assert transfer.attributes["pdmesh.backend"] == "grpc"
    decode = one("pdmesh-decode", "decode")
    assert decode.attributes["pdmesh.output_tokens"] == 4
    assert decode.events == ["first_token"]


def _status(gateway: ServiceProc) -> int:
    try:
        with urllib.request.urlopen(f"http://{gateway.address}/health", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


# -- 3. Prometheus finds and scrapes everything ------------------------------------------------


@pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus (apt-get install prometheus)"
)
def test_prometheus_scrapes_every_service_through_discovery(mesh: Mesh, tmp_path: Path) -> None:
    sd_port, web_port = free_port(), free_port()
    sd_log = (tmp_path / "http_sd.log").open("wb")
    sd = subprocess.Popen(
        [sys.executable, "-m", "pdmesh.telemetry.http_sd", "--host", "127.0.0.1",
         "--port", str(sd_port), "--consul-addr", mesh.agent.http_addr],
        cwd=REPO_ROOT, stdout=sd_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    config = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdmesh"]
    job["http_sd_configs"] = [
        {"url": f"http://127.0.0.1:{sd_port}/targets", "refresh_interval": "1s"}
    ]
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    prom_log = (tmp_path / "prometheus.log").open("wb")
    assert PROMETHEUS is not None
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config_path}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=prom_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    expected = {TOKENIZER, ROUTER, GATEWAY, PREFILL, WORKER}
    up: dict[str, dict[str, Any]] = {}

    def all_up() -> bool:
        assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
        assert sd.poll() is None, (tmp_path / "http_sd.log").read_text()
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{web_port}/api/v1/targets", timeout=2
            ) as r:
                targets = json.loads(r.read())["data"]["activeTargets"]
        except OSError:
            return False
        up.clear()
        for t in targets:
            if t["labels"].get("job") == "pdmesh" and t["health"] == "up":
                up[t["labels"]["service"]] = t
        return expected <= set(up)

    try:
        wait_until(f"Prometheus has {sorted(expected)} up", all_up, 60)
    finally:
        prometheus.terminate()
        sd.terminate()
        prometheus.wait(timeout=30)
        sd.wait(timeout=30)
        prom_log.close()
        sd_log.close()
    assert up[WORKER]["labels"]["tags"] == "decode"
    assert up[PREFILL]["labels"]["kv_transfer"] == "grpc"
    assert up[GATEWAY]["scrapeUrl"] == f"http://{mesh.gateway.address}/metrics"
