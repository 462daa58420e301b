"""Finding services: one interface (``Discovery``), two backends.

- ``static``: the addresses given on the command line; registration is a no-op.
- ``consul``: each instance registers itself with the local Consul agent (native gRPC health
  check, or HTTP for the gateway) and deregisters on graceful shutdown; watchers long-poll the
  healthy instances of a service and get the whole set each time it changes. A Consul outage
  keeps the last known set; the watch resyncs when the agent answers again.

A gRPC service (flags: ``add_dataclass_args(parser, DiscoveryConfig)``):

    discovery = make_discovery(dconf, static={WORKER: config.workers})
    reg = registration_for(dconf, WORKER, config.host, 0, tags=(TAG_AGG,), meta={...})
    await serve_registered(rpc, config.host, config.port, config.grace_period, discovery, reg)

A watcher (e.g. the router over its ``WorkerSet``; one ``diffing`` per watch):

    for service in (WORKER, PREFILL):
        discovery.watch(service, None, diffing(
            lambda e: workers.add(e.target, role=e.role or "aggregated", id=e.id),
            lambda e: workers.remove(id=e.id)))
"""

from pdmesh.discovery.base import Discovery, Watch, diffing
from pdmesh.discovery.config import DiscoveryConfig
from pdmesh.discovery.consul import ConsulDiscovery
from pdmesh.discovery.consul_api import ConsulError, ConsulUnavailable
from pdmesh.discovery.lifecycle import (
    NO_HOOKS,
    Registered,
    ServeHooks,
    make_discovery,
    registered,
    registration_for,
    serve_registered,
)
from pdmesh.discovery.model import (
    GATEWAY,
    META_BOOTSTRAP_PORT,
    META_IB_DEVICE,
    META_KV_BACKEND,
    META_KV_PROTOCOL,
    META_METRICS_PORT,
    META_MIGRATION_LIMIT,
    META_MODEL,
    META_PAGE_SIZE,
    PREFILL,
    ROUTER,
    TAG_AGG,
    TAG_DECODE,
    TAG_PREFILL,
    TOKENIZER,
    WORKER,
    Endpoint,
    OnChange,
    ServiceRegistration,
)
from pdmesh.discovery.static import StaticDiscovery, endpoints_from_addresses

__all__ = [
    "GATEWAY",
    "META_BOOTSTRAP_PORT",
    "META_IB_DEVICE",
    "META_KV_BACKEND",
    "META_KV_PROTOCOL",
    "META_METRICS_PORT",
    "META_MIGRATION_LIMIT",
    "META_MODEL",
    "META_PAGE_SIZE",
    "PREFILL",
    "ROUTER",
    "TAG_AGG",
    "TAG_DECODE",
    "TAG_PREFILL",
    "TOKENIZER",
    "WORKER",
    "ConsulDiscovery",
    "ConsulError",
    "ConsulUnavailable",
    "Discovery",
    "DiscoveryConfig",
    "Endpoint",
    "OnChange",
    "Registered",
    "ServiceRegistration",
    "StaticDiscovery",
    "Watch",
    "diffing",
    "endpoints_from_addresses",
    "make_discovery",
    "registered",
    "registration_for",
    "serve_registered",
    "NO_HOOKS",
    "ServeHooks",
]
