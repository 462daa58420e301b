"""``DiscoveryConfig``: the discovery flags every service shares.

Add them next to a service's own flags (field names do not clash with theirs):

    add_dataclass_args(parser, DiscoveryConfig)
    discovery_config = from_args(DiscoveryConfig, args)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from pdmesh.config import flag
from pdmesh.discovery.model import WILDCARDS

BACKENDS = ("static", "consul")
DEFAULT_CONSUL_ADDR = "127.0.0.1:8500"
# Consul reaps critical services every 30 s and ignores timeouts below a minute
MIN_DEREGISTER_AFTER_S = 60.0
# pdmesh's own name first, then the one the consul CLI reads
CONSUL_TOKEN_ENV = ("PDMESH_CONSUL_TOKEN", "CONSUL_HTTP_TOKEN")


@dataclass(frozen=True)
class DiscoveryConfig:
    discovery: str = flag(
        "static",
        "how services find each other: 'static' (addresses given by flags) or 'consul' "
        "(register this instance in Consul and watch the catalog)",
    )
    consul_addr: str = flag(
        "",
        f"Consul agent HTTP address, [http[s]://]host[:port]; empty: {DEFAULT_CONSUL_ADDR}",
        env="CONSUL_HTTP_ADDR",
    )
    consul_token: str = flag(
        "",
        "Consul ACL token, sent as X-Consul-Token (never logged); prefer the environment "
        "variables (flags show in ps)",
        env=CONSUL_TOKEN_ENV,
        secret=True,
    )
    consul_check_interval: float = flag(
        2.0,
        "seconds between Consul's health checks of this instance (native gRPC health, or "
        "HTTP /health for the gateway); a dead instance leaves watchers' sets within about this",
    )
    consul_deregister_after: float = flag(
        90.0,
        "seconds an instance may stay critical before Consul removes it from the catalog "
        f"(at least {MIN_DEREGISTER_AFTER_S:.0f}; a graceful stop deregisters at once)",
    )
    advertise_address: str = flag(
        "",
        "address other services dial this one at, as registered in Consul; empty: --host, "
        "or this host's IP when --host is a wildcard",
        env="PDMESH_ADVERTISE_ADDRESS",
    )
    service_id: str = flag(
        "", "Consul service id of this instance; empty: <service name>-<address>-<port>"
    )
    service_tags: str = flag(
        "", "extra comma-separated Consul tags for this instance (its role tags are added)"
    )

    def __post_init__(self) -> None:
        if self.discovery not in BACKENDS:
            raise ValueError(f"--discovery={self.discovery!r}; choose {', '.join(BACKENDS)}")
        if self.consul_check_interval <= 0:
            raise ValueError(f"--consul-check-interval={self.consul_check_interval} must be > 0")
        if self.consul_deregister_after < MIN_DEREGISTER_AFTER_S:
            raise ValueError(
                f"--consul-deregister-after={self.consul_deregister_after} must be >= "
                f"{MIN_DEREGISTER_AFTER_S:.0f} (Consul's minimum)"
            )
        if "," in self.service_id:
            raise ValueError(f"--service-id={self.service_id!r} must be one id")

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.service_tags.split(",") if t.strip())

    def resolved_consul_addr(self) -> str:
        """``--consul-addr``, else ``$CONSUL_HTTP_ADDR``, else the local agent. (``from_args``
        already applied the variable; this covers configs built in code.)"""
        return self.consul_addr or os.environ.get("CONSUL_HTTP_ADDR") or DEFAULT_CONSUL_ADDR

    def resolved_consul_token(self) -> str:
        """``--consul-token``, else the first of ``CONSUL_TOKEN_ENV`` that is set."""
        return self.consul_token or next(
            (os.environ[name] for name in CONSUL_TOKEN_ENV if name in os.environ), ""
        )

    def advertised(self, listen_host: str) -> str:
        """The address to register for a server listening on ``listen_host``."""
        if self.advertise_address:
            return self.advertise_address
        if listen_host not in WILDCARDS:
            return listen_host
        # a wildcard listener is reachable at this host's own address
        return socket.gethostbyname(socket.gethostname())
