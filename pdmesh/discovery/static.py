"""The ``static`` backend: fixed address lists from the command line, nothing registered.

Each watch delivers its fixed set once (an empty set too, so callers waiting on ``ready`` go on)
and ends; registration is a no-op, so services call the same code in both modes.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from pdmesh.discovery.base import Watch
from pdmesh.discovery.model import Endpoint, OnChange, ServiceRegistration

log = logging.getLogger(__name__)


class StaticDiscovery:
    def __init__(self, endpoints: Mapping[str, Iterable[Endpoint]] | None = None) -> None:
        """``endpoints``: per service name, its instances (see ``endpoints_from_addresses``)."""
        self._endpoints = {name: frozenset(eps) for name, eps in (endpoints or {}).items()}
        self._watches: list[Watch] = []

    async def register(self, registration: ServiceRegistration) -> None:
        log.debug(
            "static discovery: %s at %s is not registered anywhere",
            registration.name,
            registration.target,
        )

    async def deregister(self, registration: ServiceRegistration) -> None:
        pass

    def watch(self, service: str, tag: str | None, on_change: OnChange) -> Watch:
        found = self._endpoints.get(service, frozenset())
        if tag is not None:
            found = frozenset(e for e in found if e.has_tag(tag))
        watch = Watch(service, tag, on_change)
        self._watches.append(watch)
        return watch.start(watch.deliver(found))

    async def close(self) -> None:
        for watch in self._watches:
            await watch.stop()
        self._watches.clear()


def endpoints_from_addresses(
    addresses: str | Iterable[str], tags: Iterable[str] = ()
) -> frozenset[Endpoint]:
    """``"h1:p1,h2:p2"`` (or a list of ``host:port``) as endpoints whose id is the address, as
    the router names workers added by address."""
    if isinstance(addresses, str):
        addresses = addresses.split(",")
    found = set()
    for raw in addresses:
        address = raw.strip()
        if not address:
            continue
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{address!r} is not host:port")
        found.add(Endpoint(address, host.strip("[]"), int(port), tuple(tags)))
    return frozenset(found)
