"""The processes of ``vs-smg``: the tokenizer service, pdmesh workers, and the two fronts in
front of them (pdmesh's router + gateway, and smg in gRPC mode), each started into a ``Fleet``.

A front counts as ready only once its ``/workers`` lists every worker healthy: a front that
routes while it knows only some workers would pile the first requests (and so the first
tenants' prefixes) onto those, which decides a cache-aware benchmark before it starts.
"""

from __future__ import annotations

import json
import time
import urllib.request
from dataclasses import dataclass

from benchmarks.routers.fleet import Child, ChildDied, Fleet, free_port
from pdmesh.models.source import resolve

HTTP_TIMEOUT_S = 5.0
POLL_S = 0.2


@dataclass(frozen=True)
class Worker:
    address: str  # host:port of its gRPC server (both protocols)
    metrics_url: str  # its Prometheus /metrics ("" when not served)
    child: Child


def start_tokenizer(fleet: Fleet, model: str) -> str:
    """The tokenizer service pdmesh's router uses; its address (not yet waited for)."""
    port = free_port()
    fleet.start(
        "tokenizer",
        ["-m", "services.tokenizer", "--port", str(port), "--model", model],
        f"grpc://127.0.0.1:{port}",
    )
    return f"127.0.0.1:{port}"


def start_workers(
    fleet: Fleet,
    *,
    count: int,
    model: str,
    device: str,
    num_pages: int,
    max_model_len: int,
    page_size: int = 0,
    tag: str = "worker",
    metrics: bool = False,
) -> list[Worker]:
    """``count`` aggregated workers (``services.decode``), healthy on return. ``page_size`` 0:
    the engine's default; ``metrics``: each serves /metrics (requests per worker)."""
    workers = []
    for i in range(count):
        port = free_port()
        args = [
            "-m", "services.decode", "--port", str(port), "--model", model,
            "--device", device, "--num-pages", str(num_pages),
            "--max-model-len", str(max_model_len), "--log-level", "warning",
            "--grace-period", "2",
        ]  # fmt: skip
        if page_size:
            args += ["--page-size", str(page_size)]
        metrics_url = ""
        if metrics:
            metrics_port = free_port()
            args += ["--metrics-port", str(metrics_port)]
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        child = fleet.start(f"{tag}-{i}", args, f"grpc://127.0.0.1:{port}")
        workers.append(Worker(f"127.0.0.1:{port}", metrics_url, child))
    fleet.wait_healthy([w.child for w in workers])
    return workers


def start_pdmesh(
    fleet: Fleet, tokenizer: str, workers: list[str], policy: str, tag: str = ""
) -> tuple[str, list[Child]]:
    """pdmesh's router (``policy``) + gateway over ``workers``: the gateway's base URL and the
    two children. Does not wait; see ``wait_ready``."""
    router_port, gateway_port = free_port(), free_port()
    name = f"{tag}-{policy}" if tag else policy
    router = fleet.start(
        f"router-{name}",
        [
            "-m", "services.router", "--port", str(router_port), "--workers", ",".join(workers),
            "--tokenizer", tokenizer, "--policy", policy, "--log-level", "warning",
            "--grace-period", "2",
        ],
        f"grpc://127.0.0.1:{router_port}",
    )  # fmt: skip
    gateway = fleet.start(
        f"gateway-{name}",
        [
            "-m", "services.gateway", "--port", str(gateway_port),
            "--router", f"127.0.0.1:{router_port}", "--log-level", "warning",
            "--grace-period", "2",
        ],
        f"http://127.0.0.1:{gateway_port}/health",
    )  # fmt: skip
    return f"http://127.0.0.1:{gateway_port}", [router, gateway]


def start_smg(
    fleet: Fleet,
    model: str,
    workers: list[str],
    policy: str,
    tag: str = "",
    extra_args: list[str] | None = None,
) -> tuple[str, list[Child]]:
    """smg (``smg.launch_router``, gRPC mode, ``policy``, then ``extra_args``; smg's defaults
    for every other setting) over ``workers``: its base URL and the child. Does not wait; see
    ``wait_ready``."""
    source = resolve(model)
    if source.path is None:
        raise ValueError(f"--model={model!r} has no tokenizer files for smg (random weights)")
    port = free_port()
    name = f"{tag}-{policy}" if tag else policy
    smg = fleet.start(
        f"smg-{name}",
        [
            "-m", "smg.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--worker-urls", *(f"grpc://{w}" for w in workers), "--policy", policy,
            "--tokenizer-path", str(source.path), "--log-level", "warn",
            "--shutdown-grace-period-secs", "2", *(extra_args or []),
        ],
        f"http://127.0.0.1:{port}/readiness",
    )  # fmt: skip
    return f"http://127.0.0.1:{port}", [smg]


def wait_ready(fleet: Fleet, url: str, children: list[Child], num_workers: int) -> None:
    """Until the front's children are healthy and its ``/workers`` lists ``num_workers``
    healthy workers (pdmesh's gateway says ``healthy``, smg ``is_healthy``); raises
    ``ChildDied`` when one exits or the fleet's startup timeout passes."""
    fleet.wait_healthy(children)
    deadline = time.monotonic() + fleet.startup_timeout
    seen: object = None
    while True:
        for child in children:
            child.check_alive()
        try:
            seen = json.loads(http_get(f"{url}/workers")).get("workers", [])
        except (OSError, ValueError, AttributeError) as e:  # not up yet; an odd answer
            seen = str(e)
        if isinstance(seen, list) and len(healthy_workers(seen)) == num_workers:
            return
        if time.monotonic() > deadline:
            raise ChildDied(f"{url} does not list {num_workers} healthy workers: {seen}")
        time.sleep(POLL_S)


def http_get(url: str) -> str:
    """The body of a GET answered 200 (stdlib only: the benchmark needs no HTTP client
    beyond the load generator's); raises ``OSError`` (``urllib.error.URLError``) otherwise."""
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as reply:
        return str(reply.read().decode())


def healthy_workers(listed: list[object]) -> list[object]:
    return [w for w in listed if isinstance(w, dict) and (w.get("healthy") or w.get("is_healthy"))]
