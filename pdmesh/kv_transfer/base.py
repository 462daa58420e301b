"""The interface every KV-transfer backend implements.

A decode worker opens a ``KVReceiver`` on its KV cache and sends ``receiver.handle`` to each
prefill worker; a prefill worker opens one ``KVSender`` on its own cache and calls
``await sender.write(handle, src_pages, dst_pages)`` per room (or per chunk of a room). Writes
are pushes: the receiver takes no part beyond having its memory reachable.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer.coalesce import Block, coalesce
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats

DEFAULT_TIMEOUT_S = 30.0


def backend_mismatch(offered: str, sending: str) -> str | None:
    """Why a prefill sending with ``sending`` cannot use a decode's ``offered`` backend."""
    if offered == sending:
        return None
    return (
        f"it receives KV with the {offered!r} transfer backend, this prefill sends with "
        f"{sending!r} (--kv-transfer-backend must match, or be 'auto')"
    )


class KVReceiver(ABC):
    """The decode side: makes a KV cache writable by remote senders until ``close()``."""

    backend: ClassVar[str]

    @classmethod
    @abstractmethod
    def open(cls, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> KVReceiver:
        """Expose ``kv_cache`` (described by ``layout``) to senders that reach ``host``.
        Backends add keyword-only options with defaults."""

    @property
    @abstractmethod
    def handle(self) -> ReceiverHandle:
        """What a sender needs to write here (send it to the prefill at registration)."""

    @property
    def handles(self) -> list[ReceiverHandle]:
        """Every handle writes can come through, preferred first (``auto`` offers several;
        the prefill takes the first its sender can use)."""
        return [self.handle]

    @property
    def transport(self) -> str:
        """The mooncake transport writes come in over ("tcp", "rdma"); "" for other backends."""
        return next((h.transport for h in self.handles if h.transport), "")

    @abstractmethod
    def close(self) -> None:
        """Stop accepting writes and release the memory registration. Idempotent."""


class KVSender(ABC):
    """The prefill side: pushes pages of its own KV cache into receivers' caches."""

    backend: ClassVar[str]
    # the mooncake transport this sender's engine runs ("tcp", "rdma"); "" for other backends
    transport: str = ""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        self.kv_cache = kv_cache
        self.layout = layout

    @classmethod
    @abstractmethod
    def open(cls, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> KVSender:
        """Make ``kv_cache`` (described by ``layout``) readable for writes from ``host``."""

    @abstractmethod
    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        """Copy our ``src_pages[i]`` onto the receiver's ``dst_pages[i]`` for every layer and
        both K and V; return once the receiver has the bytes. Raises ``KVTransferError`` naming
        the receiver on failure or when ``timeout`` seconds pass."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections and the memory registration. Idempotent."""

    def refusal(self, dest: ReceiverHandle) -> str | None:
        """Why this sender cannot write to ``dest`` (checked at registration), None if it can.
        The KV layouts are checked apart from this."""
        return backend_mismatch(dest.backend, self.backend)

    def plan(self, dest: ReceiverHandle, src_pages: list[int], dst_pages: list[int]) -> list[Block]:
        """Check ``dest`` against our layout and coalesce the pages into byte blocks."""
        if dest.backend != self.backend:
            raise KVTransferError(
                f"receiver {dest.address} uses the {dest.backend!r} backend, this sender is "
                f"{self.backend!r}",
                peer=dest.address,
            )
        if errors := self.layout.compatibility_errors(dest.layout):
            raise KVTransferError(
                f"KV layout of receiver {dest.address} does not match ours: " + "; ".join(errors),
                peer=dest.address,
            )
        try:
            return coalesce(self.layout, src_pages, dst_pages, dest.layout)
        except ValueError as e:
            raise KVTransferError(f"write to {dest.address}: {e}", peer=dest.address) from e
