"""The one interface both backends implement, and the watch handle they share.

A watch runs in an asyncio task of its own and calls ``on_change`` with the whole current set
of healthy endpoints — once at start, then each time the set changes (never twice in a row with
the same set). ``diffing`` turns that into add/remove calls for APIs like the router's
``WorkerSet``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol

from pdmesh.discovery.model import Endpoint, OnChange, ServiceRegistration

log = logging.getLogger(__name__)


class Discovery(Protocol):
    async def register(self, registration: ServiceRegistration) -> None:
        """Make this instance findable (and keep it so until ``deregister``)."""

    async def deregister(self, registration: ServiceRegistration) -> None:
        """Remove it at once (graceful shutdown)."""

    def watch(self, service: str, tag: str | None, on_change: OnChange) -> Watch:
        """Start watching the healthy instances of ``service`` (with ``tag``, if given)."""

    async def close(self) -> None:
        """Stop every watch and registration keeper; release connections."""


class Watch:
    """A running watch. ``endpoints`` is the last set delivered; ``ready`` is set once the
    first one was; ``stop()`` (or leaving ``async with``) ends it."""

    def __init__(self, service: str, tag: str | None, on_change: OnChange) -> None:
        self.service = service
        self.tag = tag
        self.ready = asyncio.Event()
        self._on_change = on_change
        self._endpoints: frozenset[Endpoint] | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def endpoints(self) -> frozenset[Endpoint]:
        return self._endpoints or frozenset()

    @property
    def label(self) -> str:
        return f"{self.service}[{self.tag}]" if self.tag else self.service

    def start(self, loop_body: Coroutine[Any, Any, None]) -> Watch:
        self._task = asyncio.get_running_loop().create_task(loop_body, name=f"watch {self.label}")
        return self

    async def deliver(self, endpoints: frozenset[Endpoint]) -> None:
        """Hand ``endpoints`` to ``on_change`` if they differ from the last set. A failing
        callback is logged, not raised: it must not end the watch."""
        if endpoints == self._endpoints:
            return
        self._endpoints = endpoints
        try:
            await _maybe_await(self._on_change(endpoints))
        except Exception:
            log.exception("on_change of the %s watch failed", self.label)
        self.ready.set()

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


Handler = Callable[[Endpoint], "Awaitable[object] | object"]


def diffing(added: Handler, removed: Handler) -> Callable[[frozenset[Endpoint]], Awaitable[None]]:
    """An ``on_change`` that calls ``removed(e)`` for each endpoint that left the set and then
    ``added(e)`` for each that joined (an endpoint whose meta changed is both). Handlers may be
    sync or async; one that raises is logged and the others still run. One ``diffing`` per
    watch: it remembers what its own watch delivered.

        workers_watch = discovery.watch(WORKER, TAG_DECODE, diffing(
            lambda e: workers.add(e.target, id=e.id), lambda e: workers.remove(id=e.id)))
    """
    known: set[Endpoint] = set()

    async def on_change(endpoints: frozenset[Endpoint]) -> None:
        for endpoint in sorted(known - endpoints, key=_order):
            await _guarded(removed, endpoint, "remove")
            known.discard(endpoint)
        for endpoint in sorted(endpoints - known, key=_order):
            # one that failed to go in stays unknown, so the next change tries it again
            if await _guarded(added, endpoint, "add"):
                known.add(endpoint)

    return on_change


def _order(endpoint: Endpoint) -> tuple[str, str, int]:
    return endpoint.id, endpoint.address, endpoint.port


async def _guarded(handler: Handler, endpoint: Endpoint, what: str) -> bool:
    try:
        await _maybe_await(handler(endpoint))
    except Exception:
        log.exception("could not %s %s (%s)", what, endpoint.id, endpoint.target)
        return False
    return True


async def _maybe_await(result: object) -> None:
    if inspect.isawaitable(result):
        await result
