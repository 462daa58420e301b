"""``DecodeRegistry``: the decode workers registered with this prefill, and the layout check.

A decode registers once per prefill (``RegisterDecode``) with its KV layout and the handle its
transfer backend receives pages through. A layout that does not match the prefill's is refused
there, with every mismatch named, so no request ever waits on a transfer that cannot work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pdmesh.engine.outputs import KVLayout
from pdmesh.errors import FailedPreconditionError, RequestNotFoundError
from pdmesh.kv_transfer import ReceiverHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodePeer:
    decode_id: str  # unique per decode process: a restarted decode registers anew
    address: str  # its WorkerService, for messages
    receiver: ReceiverHandle  # with the decode's KV layout

    @property
    def layout(self) -> KVLayout:
        return self.receiver.layout


class DecodeRegistry:
    def __init__(self, layout: KVLayout, backend: str) -> None:
        """``layout``: this prefill's own KV layout; ``backend``: its KV transfer backend."""
        self.layout = layout
        self.backend = backend
        self._peers: dict[str, DecodePeer] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def register(self, peer: DecodePeer) -> None:
        """Keep ``peer`` (replacing an earlier registration under its id); raises
        ``FailedPreconditionError`` naming every layout mismatch."""
        if peer.receiver.backend != self.backend:
            raise FailedPreconditionError(
                f"decode {peer.address} receives KV with the {peer.receiver.backend!r} transfer "
                f"backend, this prefill sends with {self.backend!r} (--kv-transfer-backend must "
                "match)"
            )
        errors = self.layout.compatibility_errors(peer.layout)
        if errors:
            raise FailedPreconditionError(
                f"decode {peer.address} cannot take KV pages from this prefill: the KV layouts "
                f"differ (prefill != decode): {'; '.join(errors)}"
            )
        if peer.decode_id not in self._peers:
            log.info("decode %s registered (id %s)", peer.address, peer.decode_id)
        self._peers[peer.decode_id] = peer

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
