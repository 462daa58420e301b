"""The gateway over ``RouterService.Stream`` against the real mesh (tokenizer, worker, router:
the session's processes, the real default model): answers equal to those over per-request
``Generate`` (``--no-router-stream``), a client that leaves frees its pages at the worker within
a second, and ``--workers 2`` (two processes on one port, one Consul registration each). The
slow reader is ``test_gateway_stream_slow_reader.py``.
Generations stay short: CI machines have 2 cores."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdmesh.discovery import GATEWAY
from pdmesh.discovery.dev_agent import ConsulDevAgent
from tests.integration.procs import ServiceProc
from tests.integration.test_gateway import (
    GREETING,
    MODEL,
    sse_events,
    start_gateway,
    wait_until_idle,
    worker_load,
)

pytestmark = pytest.mark.model

OPENED = "opened a Stream call to router"
FELL_BACK = "does not implement RouterService.Stream"


@pytest.fixture(scope="module")
def stream_gateway(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProc]:
    log_dir = tmp_path_factory.mktemp("gw-stream")
    svc = start_gateway(router_proc.address, "--grace-period", "2", log_dir=log_dir)
    yield svc
    svc.stop_and_check()
    assert OPENED in svc.log and FELL_BACK not in svc.log


@pytest.fixture(scope="module")
def generate_gateway(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProc]:
    flags = ["--no-router-stream", "--grace-period", "2"]
    log_dir = tmp_path_factory.mktemp("gw-generate")
    svc = start_gateway(router_proc.address, *flags, log_dir=log_dir)
    yield svc
    svc.stop_and_check()
    assert OPENED not in svc.log


def url(gateway: ServiceProc, path: str) -> str:
    return f"http://{gateway.address}{path}"


def counts(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Usage without cached_tokens: the prefix cache warms up as the test repeats a prompt."""
    return None if usage is None else {k: v for k, v in usage.items() if "details" not in k}


def comparable(events: list[Any]) -> dict[str, Any]:
    """A streamed answer reduced to what must not depend on the path or on chunking."""
    choices: dict[int, dict[str, Any]] = {}
    usage = None
    for event in events:
        if event.get("usage"):
            usage = counts(event["usage"])
        for choice in event["choices"]:
            got = choices.setdefault(choice["index"], {"text": "", "finish": None})
            delta = choice.get("delta", {"content": choice.get("text")})
            got["text"] += delta.get("content") or ""
            got["finish"] = choice["finish_reason"] or got["finish"]
    return {"choices": choices, "usage": usage, "first": events[0]["choices"]}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 11}])
def test_stream_and_generate_paths_answer_alike(
    stream_gateway: ServiceProc,
    generate_gateway: ServiceProc,
    path: str,
    sampling: dict[str, Any],
) -> None:
    prompt = {"messages": GREETING} if "chat" in path else {"prompt": "The capital of France is"}
    body = {"model": MODEL, "max_tokens": 8, "n": 2, **prompt, **sampling}
    answers = []
    for gateway in (stream_gateway, generate_gateway):
        full = httpx.post(url(gateway, path), json=body, timeout=60)
        assert full.status_code == 200, full.text
        answer = full.json()
        streamed_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url(gateway, path), json=streamed_body, timeout=60) as r:
            assert r.status_code == 200
            events = sse_events(r)
        answers.append(
            {
                "choices": [
                    (c.get("message", {}).get("content", c.get("text")), c["finish_reason"])
                    for c in answer["choices"]
                ],
                "usage": counts(answer["usage"]),
                "stream": comparable(events),
            }
        )
    assert answers[0] == answers[1]
    stream = answers[0]["stream"]
    assert [c["text"] for c in stream["choices"].values()] == [t for t, _ in answers[0]["choices"]]
    assert stream["usage"] == answers[0]["usage"]


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_leaves_frees_its_pages_at_once(
    stream_gateway: ServiceProc, worker_proc: ServiceProc, n: int
) -> None:
    body = {
        "model": MODEL,
        "messages": GREETING,
        "max_tokens": 1000,
        "n": n,
        "ignore_eos": True,  # would run for a long while
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", url(stream_gateway, "/v1/chat/completions"), json=body) as r,
    ):
        lines = r.iter_lines()
        contents = 0
        while contents < 2 * n:  # a few tokens of each choice
            line = next(lines)
            if line.startswith("data: {") and '"content":"' in line and '"role"' not in line:
                contents += 1
        busy = worker_load(worker_proc)
        assert busy.num_running == n and busy.num_free_pages < busy.num_total_pages
    # leaving the block closed the connection mid-stream
    wait_until_idle(worker_proc, since=time.monotonic())


# -- --workers ---------------------------------------------------------------------------------


def pids_of(log: str) -> list[int]:
    line = next(line for line in log.splitlines() if "worker processes (pids" in line)
    return [int(p) for p in line.split("(pids ")[1].rstrip(")").split(", ")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_worker_processes_serve_one_port(router_proc: ServiceProc, tmp_path: Path) -> None:
    svc = start_gateway(router_proc.address, "--workers", "2", log_dir=tmp_path)
    try:
        base = f"http://{svc.address}"
        deadline = time.monotonic() + 60
        while httpx.get(f"{base}/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, svc.log
            time.sleep(0.2)
        # greedy: a sampled 4-token answer can end in EOS ("stop"), which made this flaky
        body = {"model": MODEL, "messages": GREETING, "max_tokens": 4, "temperature": 0}
        for _ in range(4):  # a new connection each: the kernel picks a process
            response = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            assert response.status_code == 200, response.text
        with httpx.stream(
            "POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=60
        ) as r:
            assert sse_events(r)[-1]["choices"][0]["finish_reason"] == "length"
        children = pids_of(svc.log)
        assert len(children) == 2 and all(alive(p) for p in children)
    finally:
        svc.stop_and_check()  # SIGTERM: exit 0
    assert not any(alive(p) for p in children)


def test_each_worker_process_registers_in_consul(tmp_path: Path) -> None:
    with ConsulDevAgent() as agent:
        flags = ["--workers", "2", "--discovery", "consul", "--consul-addr", agent.http_addr]
        flags += ["--consul-check-interval", "1", "--model-name", MODEL]
        svc = start_gateway("127.0.0.1:1", *flags, log_dir=tmp_path)
        try:
            deadline = time.monotonic() + 30
            while True:
                services = consul_services(agent)
                if len(services) == 2:
                    break
                assert time.monotonic() < deadline, f"{services}\n{svc.log}"
                time.sleep(0.2)
            base_id = f"{GATEWAY}-127.0.0.1-{svc.port}"
            assert sorted(services) == [f"{base_id}-0", f"{base_id}-1"]
            ports = {s["Port"] for s in services.values()}
            metrics_ports = {int(s["Meta"]["metrics_port"]) for s in services.values()}
            assert ports == {svc.port} and len(metrics_ports) == 2
            for port in metrics_ports:  # each process's own /metrics
                text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
                assert "pdmesh_requests_total" in text or "process_cpu_seconds_total" in text
        finally:
            svc.stop_and_check()
        assert consul_services(agent) == {}  # both deregistered on the way out


def consul_services(agent: ConsulDevAgent) -> dict[str, Any]:
    with urllib.request.urlopen(f"{agent.url}/v1/agent/services", timeout=5) as reply:
        services: dict[str, Any] = json.load(reply)
    return {k: v for k, v in services.items() if v["Service"] == GATEWAY}
