"""What discovery deals in: an instance registering itself (``ServiceRegistration``) and an
instance found by a watch (``Endpoint``), plus the service names and tags of each role."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

# One Consul service name per role; the role's flavour (prefill/decode/agg) is a tag, so one
# watch on WORKER with tag "decode" finds the decode workers.
WORKER = "pdmesh-worker"
PREFILL = "pdmesh-prefill"
ROUTER = "pdmesh-router"
TOKENIZER = "pdmesh-tokenizer"
GATEWAY = "pdmesh-gateway"
SERVICE_PREFIX = "pdmesh-"

# tags
TAG_AGG = "agg"
TAG_PREFILL = "prefill"
TAG_DECODE = "decode"

# the router's worker roles, by tag
ROLE_BY_TAG = {TAG_AGG: "aggregated", TAG_PREFILL: "prefill", TAG_DECODE: "decode"}

# meta keys (Consul meta values are strings; keys: letters, digits, '-', '_', at most 128)
META_MODEL = "model"
META_PAGE_SIZE = "page_size"
META_KV_BACKEND = "kv_transfer"
META_KV_PROTOCOL = "kv_protocol"  # the mooncake transport the worker's engine runs: tcp, rdma
META_IB_DEVICE = "ib_device"  # --disaggregation-ib-device, when set
META_BOOTSTRAP_PORT = "bootstrap_port"
META_MIGRATION_LIMIT = "migration_limit"
META_METRICS_PORT = "metrics_port"  # where Prometheus scrapes this instance (http_sd reads it)

CheckKind = Literal["grpc", "http", "none"]


@dataclass(frozen=True)
class Endpoint:
    """One healthy instance of a service, as a watch reports it."""

    id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    # excluded from the hash (dicts are unhashable) but compared: an instance that re-registers
    # with other meta is a different endpoint, so watchers see it change
    meta: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def target(self) -> str:
        """``host:port`` as gRPC channels and URLs want it (IPv6 in brackets)."""
        return join_host_port(self.address, self.port)

    def has_tag(self, tag: str) -> bool:
        return tag in self.tags

    @property
    def role(self) -> str | None:
        """The worker role its tags name (``aggregated``/``prefill``/``decode``), if any."""
        return next((ROLE_BY_TAG[t] for t in self.tags if t in ROLE_BY_TAG), None)


@dataclass(frozen=True)
class ServiceRegistration:
    """This process, as it registers itself: ``name`` is the role's service name (``WORKER``…),
    ``address`` what others dial (never a wildcard), ``check`` how Consul probes it: ``grpc``
    asks ``grpc.health.v1`` at address:port, ``http`` GETs ``http_check_path``."""

    name: str
    address: str
    port: int
    id: str = ""  # empty: derived from name, address and port (see ``service_id``)
    tags: tuple[str, ...] = ()
    meta: Mapping[str, str] = field(default_factory=dict)
    check: CheckKind = "grpc"
    http_check_path: str = "/health"
    # the gRPC check speaks TLS (the server serves --tls-cert)
    grpc_tls: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("a registration needs a service name")
        if not self.address or self.address in WILDCARDS:
            raise ValueError(
                f"cannot register {self.name} at {self.address!r}: give the address other hosts "
                "reach it at (--advertise-address)"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} of {self.name} is not in [0, 65535]")
        for key in self.meta:
            if not META_KEY.fullmatch(key):
                raise ValueError(f"Consul meta key {key!r} must match {META_KEY.pattern}")

    @property
    def service_id(self) -> str:
        """``id``, or ``<name>-<address>-<port>``: unique among live instances (one listener per
        address and port) and stable across restarts, so a restarted instance replaces its own
        stale entry instead of leaving it to expire."""
        return self.id or SAFE_ID.sub("-", f"{self.name}-{self.address}-{self.port}")

    @property
    def target(self) -> str:
        return join_host_port(self.address, self.port)

    def with_port(self, port: int) -> ServiceRegistration:
        """The same registration at ``port`` (the port a server bound when asked for 0)."""
        return replace(self, port=port)


OnChange = Callable[[frozenset[Endpoint]], "Awaitable[None] | None"]
"""A watch callback: the whole current set of healthy endpoints, each time it changes."""

WILDCARDS = frozenset({"0.0.0.0", "::", "[::]", ""})
META_KEY = re.compile(r"[A-Za-z0-9_-]{1,128}")
SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


def join_host_port(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"
