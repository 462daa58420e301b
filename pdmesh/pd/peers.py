"""What the decode side needs from the prefill workers it takes KV from, as Python protocols;
the gRPC implementation (``BootstrapService`` calls) is the worker service's
(``services.worker.peers.GrpcPrefillPeers``), so ``pdmesh.pd`` holds no proto type.

A peer registers this decode once (KV layout + transfer handles) and caches the prefill's
instance id; the registration is redone after ``forget`` (the heartbeat reports the prefill
lost or restarted) or when the prefill answers that it does not know this decode. Failures are
``pdmesh.errors`` types naming the prefill."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from pdmesh.pd.registry import DecodePeer
from pdmesh.pd.values import FirstToken


class PrefillPeer(Protocol):
    @property
    def instance_id(self) -> str | None:
        """The prefill instance this decode is registered with; None until registered."""
        ...

    async def ensure_registered(self) -> str:
        """Register with the prefill unless done already; returns its instance id."""
        ...

    def forget(self) -> None:
        """Register again before the next room (the prefill was lost or restarted)."""
        ...

    async def transfer(
        self,
        room: int,
        page_ids: list[int],
        request_id: str,
        on_writing: Callable[[], None],
        timeout: float,
    ) -> FirstToken:
        """Send the room's destination pages and wait for its KV and first token;
        ``on_writing`` is called when the prefill starts writing into the pages."""
        ...


class PrefillPeers(Protocol):
    # what this decode registers with every prefill; set once its receiver's address is known
    registration: DecodePeer | None

    def get(self, address: str) -> PrefillPeer: ...

    def forget(self, address: str) -> None: ...

    async def ping(self, address: str, timeout: float) -> str:
        """The instance id of the prefill at ``address`` (raises: the heartbeat counts it)."""
        ...

    async def close(self) -> None: ...
