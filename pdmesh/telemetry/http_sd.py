"""Prometheus HTTP service discovery over the Consul catalog.

Debian's Prometheus is built without Consul discovery; ``http_sd_configs`` works everywhere. This
serves ``GET /targets``: every registered pdmesh instance (healthy or not — Prometheus then shows
a dying one as down) that has a ``metrics_port`` in its Consul meta, as

    [{"targets": ["10.0.0.5:9101"],
      "labels": {"service": "pdmesh-worker", "service_id": "pdmesh-worker-10.0.0.5-50053",
                 "__meta_consul_service": "pdmesh-worker", "__meta_consul_tags": ",decode,",
                 "__meta_consul_service_metadata_model": "…", …}}]

The ``__meta_consul_*`` labels are named as Prometheus' own consul_sd names them, so relabel
rules written for that work unchanged (``deploy/prometheus/prometheus.yml`` keeps a few).
When Consul is unreachable it answers 503, and Prometheus keeps the targets it had.

    python -m pdmesh.telemetry.http_sd --port 9099 --consul-addr 127.0.0.1:8500
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.discovery.config import CONSUL_TOKEN_ENV, DEFAULT_CONSUL_ADDR
from pdmesh.discovery.consul import ConsulDiscovery
from pdmesh.discovery.consul_api import ConsulError, ConsulUnavailable
from pdmesh.discovery.model import META_METRICS_PORT, SERVICE_PREFIX, Endpoint, join_host_port
from pdmesh.rpc.server import LOG_LEVELS, configure_logging, wait_for_signal

log = logging.getLogger(__name__)

_LABEL_UNSAFE = re.compile(r"[^A-Za-z0-9_]")


def http_sd_targets(catalog: Mapping[str, Iterable[Endpoint]]) -> list[dict[str, Any]]:
    """Prometheus ``http_sd`` target groups, one per instance that exposes metrics."""
    groups: list[dict[str, Any]] = []
    for name in sorted(catalog):
        for endpoint in sorted(catalog[name], key=lambda e: e.id):
            port = endpoint.meta.get(META_METRICS_PORT, "")
            if not port.isdigit() or not 0 < int(port) <= 65535:
                continue
            labels = {
                "service": name,
                "service_id": endpoint.id,
                "__meta_consul_service": name,
                "__meta_consul_service_id": endpoint.id,
                "__meta_consul_service_address": endpoint.address,
                "__meta_consul_service_port": str(endpoint.port),
                # commas around, as consul_sd does, so a regex like .*,decode,.* matches a tag
                "__meta_consul_tags": f",{','.join(endpoint.tags)}," if endpoint.tags else "",
            }
            for key, value in sorted(endpoint.meta.items()):
                labels[f"__meta_consul_service_metadata_{_LABEL_UNSAFE.sub('_', key)}"] = value
            target = join_host_port(endpoint.address, int(port))
            groups.append({"targets": [target], "labels": labels})
    return groups


def sd_app(discovery: ConsulDiscovery, prefix: str = SERVICE_PREFIX) -> web.Application:
    """The aiohttp app: ``GET /targets`` (the JSON above), ``GET /health``."""

    async def targets(request: web.Request) -> web.Response:
        try:
            catalog = await discovery.catalog(prefix)
        except (ConsulUnavailable, ConsulError) as e:
            log.warning("Consul catalog unavailable: %s", e)
            return web.json_response({"error": str(e)}, status=503)
        return web.json_response(http_sd_targets(catalog))

    async def health(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/targets", targets)
    app.router.add_get("/health", health)
    return app


@dataclass(frozen=True)
class HttpSdConfig:
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(9099, "HTTP port of /targets; 0 picks a free one")
    consul_addr: str = flag(
        "",
        f"Consul agent HTTP address; empty: {DEFAULT_CONSUL_ADDR}",
        env="CONSUL_HTTP_ADDR",
    )
    consul_token: str = flag(
        "",
        "Consul ACL token (needs service:read)",
        env=CONSUL_TOKEN_ENV,
        secret=True,
    )
    service_prefix: str = flag(SERVICE_PREFIX, "only services whose name starts with this")
    log_level: str = flag("info", f"log verbosity: {', '.join(LOG_LEVELS)}")

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535]")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")


async def serve(config: HttpSdConfig) -> None:
    discovery = ConsulDiscovery(config.consul_addr or DEFAULT_CONSUL_ADDR, config.consul_token)
    runner = web.AppRunner(sd_app(discovery, config.service_prefix), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else config.port
        log.info(
            "Prometheus http_sd on http://%s:%d/targets (Consul %s)",
            config.host,
            port,
            discovery.api.base_url,
        )
        await wait_for_signal()
    finally:
        await runner.cleanup()
        await discovery.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pdmesh.telemetry.http_sd",
        description="Prometheus HTTP service discovery: pdmesh instances in Consul as targets.",
    )
    add_dataclass_args(parser, HttpSdConfig)
    try:
        config = from_args(HttpSdConfig, parser.parse_args(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
