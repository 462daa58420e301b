"""``DecodeRegistry``: the decode workers registered with this prefill, and the layout check.

A decode registers once per prefill (``RegisterDecode``) with its KV layout and the handles its
transfer backends receive pages through, fastest first (several with ``auto``); the prefill
keeps the first its sender can use. A layout that does not match the prefill's, or no handle it
can use, is refused there, with every reason named, so no request ever waits on a transfer
that cannot work.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.errors import FailedPreconditionError, RequestNotFoundError
from pdmesh.kv_transfer import ReceiverHandle
from pdmesh.kv_transfer.base import backend_mismatch
from pdmesh.kv_transfer.mooncake_transport import describe

log = logging.getLogger(__name__)


def transport_of(handle: ReceiverHandle) -> str:
    """``mooncake tcp`` / ``mooncake rdma`` / ``cuda_ipc`` / ``grpc``: how writes reach it."""
    transport = handle.transport or ("tcp" if handle.backend == "mooncake" else "")
    return describe(handle.backend, transport)


@dataclass(frozen=True)
class DecodePeer:
    decode_id: str  # unique per decode process: a restarted decode registers anew
    address: str  # its WorkerService, for messages
    receiver: ReceiverHandle  # with the decode's KV layout; at the prefill: the one it uses
    alternatives: tuple[ReceiverHandle, ...] = ()  # further handles offered (``auto``)

    @property
    def layout(self) -> KVLayout:
        return self.receiver.layout


# why this prefill's sender cannot write to a handle, None if it can (``KVSender.refusal``)
Refusal = Callable[[ReceiverHandle], "str | None"]


def by_backend(backend: str) -> Refusal:
    """Accept handles of ``backend`` only (a sender's ``refusal`` without the sender)."""

    def refusal(handle: ReceiverHandle) -> str | None:
        return backend_mismatch(handle.backend, backend)

    return refusal


class DecodeRegistry:
    def __init__(self, layout: KVLayout, refusal: Refusal) -> None:
        """``layout``: this prefill's own KV layout; ``refusal``: why its KV sender cannot
        write to a handle (``KVSender.refusal``)."""
        self.layout = layout
        self._refusal = refusal
        self._peers: dict[str, DecodePeer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def register(self, peer: DecodePeer) -> None:
        """Keep ``peer`` with the first handle this prefill can write to (replacing an earlier
        registration under its id); raises ``FailedPreconditionError`` naming every layout
        mismatch, or why no offered handle is usable."""
        offers = (peer.receiver, *peer.alternatives)
        reasons = {h.backend: self._refusal(h) for h in offers}
        usable = [h for h in offers if reasons[h.backend] is None]
        if not usable:
            raise FailedPreconditionError(
                f"decode {peer.address} cannot take KV pages from this prefill: "
                + "; ".join(r for r in reasons.values() if r)
            )
        peer = dataclasses.replace(peer, receiver=usable[0], alternatives=())
        errors = self.layout.compatibility_errors(peer.layout)
        if errors:
            raise FailedPreconditionError(
                f"decode {peer.address} cannot take KV pages from this prefill: the KV layouts "
                f"differ (prefill != decode): {'; '.join(errors)}"
            )
        if peer.decode_id not in self._peers:
            log.info(
                "decode %s registered (id %s), KV over %s to %s",
                peer.address,
                peer.decode_id,
                transport_of(peer.receiver),
                peer.receiver.address,
            )
        self._peers[peer.decode_id] = peer

    def transport(self, decode_id: str) -> str:
        """How KV goes to a registered decode ("mooncake tcp", "cuda_ipc", ...); "" unknown."""
        peer = self._peers.get(decode_id)
        return transport_of(peer.receiver) if peer is not None else ""

    def get(self, decode_id: str) -> DecodePeer:
        """Raises ``RequestNotFoundError`` (NOT_FOUND) for an unknown id: the decode must
        register again (this prefill restarted since it did)."""
        peer = self._peers.get(decode_id)
        if peer is None:
            raise RequestNotFoundError(
                f"decode {decode_id!r} is not registered with this prefill (it restarted since?); "
                "call RegisterDecode again"
            )
        return peer
