"""A real Prometheus (Debian's) scrapes a real service found through pdmesh's http_sd endpoint
over a real Consul catalog, with ``deploy/prometheus/prometheus.yml``'s own relabel rules."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from pdmesh.discovery import META_METRICS_PORT, ConsulDiscovery, ServiceRegistration
from pdmesh.discovery.dev_agent import ConsulDevAgent, free_port
from pdmesh.rpc.server import RpcServer
from pdmesh.telemetry import Metrics, start_metrics_server
from pdmesh.telemetry.http_sd import sd_app

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONFIG = REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROMETHEUS = shutil.which("prometheus")


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulDevAgent]:
    with ConsulDevAgent() as running:
        yield running


async def start_sd(discovery: ConsulDiscovery) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(sd_app(discovery))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


async def get_json(url: str) -> tuple[int, Any]:
    def fetch() -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    return await asyncio.to_thread(fetch)


def test_sd_lists_instances_with_metrics_and_503_without_consul(agent: ConsulDevAgent) -> None:
    async def scenario() -> None:
        discovery = ConsulDiscovery(agent.http_addr)
        with_metrics = ServiceRegistration(
            "pdmesh-sdtest",
            "127.0.0.1",
            1111,
            tags=("decode",),
            meta={META_METRICS_PORT: "9101"},
            check="none",
        )
        without = ServiceRegistration("pdmesh-sdtest", "127.0.0.1", 2222, check="none")
        foreign = ServiceRegistration(
            "other-svc", "127.0.0.1", 3333, meta={META_METRICS_PORT: "1"}, check="none"
        )
        for registration in (with_metrics, without, foreign):
            await discovery.register(registration)
        runner, port = await start_sd(discovery)
        dead = ConsulDiscovery(f"127.0.0.1:{free_port()}", request_timeout=2)
        dead_runner, dead_port = await start_sd(dead)
        try:
            status, groups = await get_json(f"http://127.0.0.1:{port}/targets")
            assert status == 200
            ours = [g for g in groups if g["labels"]["service"] == "pdmesh-sdtest"]
            assert ours == [
                {
                    "targets": ["127.0.0.1:9101"],
                    "labels": {
                        "service": "pdmesh-sdtest",
                        "service_id": with_metrics.service_id,
                        "__meta_consul_service": "pdmesh-sdtest",
                        "__meta_consul_service_id": with_metrics.service_id,
                        "__meta_consul_service_address": "127.0.0.1",
                        "__meta_consul_service_port": "1111",
                        "__meta_consul_tags": ",decode,",
                        "__meta_consul_service_metadata_metrics_port": "9101",
                    },
                }
            ]
            assert not [g for g in groups if g["labels"]["service"] == "other-svc"]
            status, body = await get_json(f"http://127.0.0.1:{dead_port}/targets")
            assert status == 503 and "error" in body
        finally:
            await runner.cleanup()
            await dead_runner.cleanup()
            for registration in (with_metrics, without, foreign):
                await discovery.deregister(registration)
            await discovery.close()
            await dead.close()

    asyncio.run(scenario())


@pytest.mark.skipif(
    PROMETHEUS is None, reason="needs Debian's prometheus (apt-get install prometheus)"
)
def test_prometheus_scrapes_through_http_sd(agent: ConsulDevAgent, tmp_path: Path) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        rpc = RpcServer(["pdmesh.test.Worker"], interceptors=[metrics.grpc_interceptor()])
        port = await rpc.start("127.0.0.1", 0)
        metrics_server = start_metrics_server(metrics, "127.0.0.1", 0)
        assert metrics_server is not None
        registration = ServiceRegistration(
            "pdmesh-promtest",
            "127.0.0.1",
            port,
            tags=("prefill",),
            meta={META_METRICS_PORT: str(metrics_server.port), "model": "tiny-model"},
        )
        discovery = ConsulDiscovery(agent.http_addr, check_interval=1.0)
        await discovery.register(registration)
        runner, sd_port = await start_sd(discovery)

        config = yaml.safe_load(DEPLOY_CONFIG.read_text())
        config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "pdmesh"]
        job["http_sd_configs"] = [
            {"url": f"http://127.0.0.1:{sd_port}/targets", "refresh_interval": "1s"}
        ]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        web_port = free_port()
        log_path = tmp_path / "prometheus.log"
        assert PROMETHEUS is not None
        with log_path.open("wb") as log:
            prometheus = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={tmp_path / 'data'}",
                    f"--web.listen-address=127.0.0.1:{web_port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        api = f"http://127.0.0.1:{web_port}/api/v1"
        try:
            target = await wait_for_up_target(api, prometheus, log_path)
            assert target["labels"]["instance"] == registration.service_id
            assert target["labels"]["service"] == "pdmesh-promtest"
            assert target["labels"]["model"] == "tiny-model"
            assert target["labels"]["tags"] == "prefill"
            assert target["scrapeUrl"] == f"http://127.0.0.1:{metrics_server.port}/metrics"
            query = urllib.parse.quote('process_cpu_seconds_total{service="pdmesh-promtest"}')
            samples = await wait_for_samples(f"{api}/query?query={query}")
            assert samples[0]["metric"]["instance"] == registration.service_id
        finally:
            prometheus.terminate()
            prometheus.wait(timeout=30)
            await runner.cleanup()
            await discovery.close()
            metrics_server.close()
            await rpc.stop(0)

    asyncio.run(scenario())


async def wait_for_up_target(
    api: str, prometheus: subprocess.Popen[bytes], log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    last: Any = None
    while time.monotonic() < deadline:
        assert prometheus.poll() is None, log_path.read_text()
        try:
            _, last = await get_json(f"{api}/targets")
            for target in last["data"]["activeTargets"]:
                if (
                    target["labels"].get("service") == "pdmesh-promtest"
                    and target["health"] == "up"
                ):
                    return dict(target)
        except (OSError, ValueError):
            pass  # not listening yet
        await asyncio.sleep(0.5)
    raise AssertionError(f"no up target; last answer {last}\n{log_path.read_text()}")


async def wait_for_samples(url: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, body = await get_json(url)
        if body["data"]["result"]:
            return list(body["data"]["result"])
        await asyncio.sleep(0.5)
    raise AssertionError(f"no samples from {url}")
