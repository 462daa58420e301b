"""How a service uses discovery: make the backend its flags ask for, register while serving.

    discovery = make_discovery(discovery_config, static={WORKER: config.workers})
    registration = registration_for(discovery_config, WORKER, config.host, 0, tags=(TAG_AGG,))
    await serve_registered(rpc, config.host, config.port, config.grace_period,
                           discovery, registration)   # instead of serve_until_signal

``serve_registered`` registers once the server listens (with the port it bound) and
deregisters as soon as SIGTERM/SIGINT arrives — before draining — so watchers stop sending new
work at once while in-flight calls finish.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from pdmesh.discovery.base import Discovery
from pdmesh.discovery.config import DiscoveryConfig
from pdmesh.discovery.consul import ConsulDiscovery
from pdmesh.discovery.model import CheckKind, Endpoint, ServiceRegistration
from pdmesh.discovery.static import StaticDiscovery, endpoints_from_addresses
from pdmesh.rpc.server import RpcServer, wait_for_signal

log = logging.getLogger(__name__)


def make_discovery(
    config: DiscoveryConfig,
    static: Mapping[str, str | Iterable[str] | Iterable[Endpoint]] | None = None,
) -> Discovery:
    """The backend ``config`` names. ``static``: per service name, what the static backend
    reports — ``"h:p,h:p"``, a list of ``host:port``, or endpoints (ignored under Consul)."""
    if config.discovery == "consul":
        return ConsulDiscovery(
            config.resolved_consul_addr(),
            config.resolved_consul_token(),
            check_interval=config.consul_check_interval,
            deregister_after=config.consul_deregister_after,
        )
    fixed: dict[str, frozenset[Endpoint]] = {}
    for name, given in (static or {}).items():
        items = [given] if isinstance(given, str) else list(given)
        if all(isinstance(i, Endpoint) for i in items):
            fixed[name] = frozenset(i for i in items if isinstance(i, Endpoint))
        else:
            fixed[name] = endpoints_from_addresses(",".join(str(i) for i in items))
    return StaticDiscovery(fixed)


def registration_for(
    config: DiscoveryConfig,
    name: str,
    listen_host: str,
    port: int,
    tags: Iterable[str] = (),
    meta: Mapping[str, object] | None = None,
    check: CheckKind = "grpc",
    grpc_tls: bool = False,
) -> ServiceRegistration:
    """This instance's registration: the advertised address for ``listen_host``, the role's
    ``tags`` plus ``--service-tags``, ``meta`` values as strings (empty ones dropped).
    ``port`` 0 means "the port the server binds" (``serve_registered`` fills it in).
    ``grpc_tls``: the server serves TLS, so Consul's gRPC check must too."""
    all_tags = tuple(dict.fromkeys((*tags, *config.tags)))  # ordered, no repeats
    return ServiceRegistration(
        name=name,
        address=config.advertised(listen_host),
        port=port,
        id=config.service_id,
        tags=all_tags,
        meta={k: str(v) for k, v in (meta or {}).items() if v is not None and str(v) != ""},
        check=check,
        grpc_tls=grpc_tls,
    )


@contextlib.asynccontextmanager
async def registered(
    discovery: Discovery, registration: ServiceRegistration
) -> AsyncIterator[Registered]:
    """Registered while inside; deregistered on the way out (also on errors and cancellation).
    ``deregister()`` on the yielded handle leaves early (e.g. when a stop signal arrives)."""
    handle = Registered(discovery, registration)
    await discovery.register(registration)
    try:
        yield handle
    finally:
        await handle.deregister()


class Registered:
    def __init__(self, discovery: Discovery, registration: ServiceRegistration) -> None:
        self.discovery = discovery
        self.registration = registration
        self._done = False

    async def deregister(self) -> None:
        """Idempotent."""
        if not self._done:
            self._done = True
            await self.discovery.deregister(self.registration)


@dataclass(frozen=True)
class ServeHooks:
    """What a service does at the steps of ``serve_registered`` beyond serving: ``started``
    (the port is bound, nothing is registered yet: a PD decode learns its address here, before
    a router can send it work), ``drained`` (the server stopped after its grace period: fail
    what is left, stop side servers). Every service's ``serve()`` is then: build, serve, close."""

    started: Callable[[int], None] = lambda bound: None
    drained: Callable[[], Awaitable[None]] | None = None


NO_HOOKS = ServeHooks()


async def serve_registered(
    rpc: RpcServer,
    host: str,
    port: int,
    grace: float,
    discovery: Discovery,
    registration: ServiceRegistration,
    hooks: ServeHooks | None = None,
) -> None:
    """``serve_until_signal`` plus discovery: start ``rpc`` on ``host:port``, register (at the
    bound port when ``registration.port`` is 0), serve until SIGTERM/SIGINT, deregister at once,
    then drain for ``grace`` seconds and stop. Closes ``discovery`` at the end. A refused
    registration (``ConsulError``: bad ACL token…) stops the server and propagates."""
    hooks = hooks or NO_HOOKS
    bound = await rpc.start(host, port)
    log.info("%s listening on %s:%d", ", ".join(rpc.service_names), host, bound)
    try:
        hooks.started(bound)
        if registration.port == 0:
            registration = registration.with_port(bound)
        async with registered(discovery, registration) as handle:
            sig = await wait_for_signal()
            log.info(
                "%s received; deregistering, then draining in-flight calls for up to %.1fs",
                sig.name,
                grace,
            )
            await handle.deregister()
    finally:
        await rpc.stop(grace)
        if hooks.drained is not None:
            await hooks.drained()
        await discovery.close()
    log.info("stopped")
