"""``Bootstrap``: the prefill side of the bootstrap protocol, without the wire.

The gRPC servicer (``services/worker/bootstrap.py``) converts messages and calls these:
``register`` (RegisterDecode), ``attach`` + ``events`` (Transfer), ``instance_id`` (Ping).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from pdmesh.errors import AbortedError, InvalidRequestError
from pdmesh.pd.registry import DecodePeer, DecodeRegistry
from pdmesh.pd.rooms import Destination, Room, RoomTable
from pdmesh.pd.values import WRITING, FirstToken, Writing


class Bootstrap:
    def __init__(self, rooms: RoomTable, decodes: DecodeRegistry) -> None:
        self.rooms = rooms
        self.decodes = decodes
        # a new id per process: a decode pinging the same address learns that we restarted
        # (and lost every room and registration) even if no heartbeat was missed
        self.instance_id = uuid.uuid4().hex

    def register(self, peer: DecodePeer) -> str:
        """Register a decode (``FailedPreconditionError`` on a layout mismatch); returns the
        instance id."""
        self.decodes.register(peer)
        return self.instance_id

    def attach(self, room_id: int, decode_id: str, request_id: str, page_ids: list[int]) -> Room:
        """The decode's half of ``room_id``: its destination pages."""
        peer = self.decodes.get(decode_id)
        if not page_ids:
            raise InvalidRequestError("dst_page_ids", "must not be empty")
        bad = [p for p in page_ids if not 0 <= p < peer.layout.num_pages]
        if bad:
            raise InvalidRequestError(
                "dst_page_ids",
                f"{bad[:5]} outside the decode's pool [0, {peer.layout.num_pages})",
            )
        destination = Destination(decode_id, tuple(page_ids), request_id)
        return self.rooms.join_decode(room_id, destination)

    @staticmethod
    async def events(room: Room) -> AsyncIterator[Writing | FirstToken]:
        """What the decode hears about ``room``: ``WRITING`` when the write starts, then the
        first token once the KV is in its pages; the room's error otherwise."""
        await room.wait_writing()
        if room.writing_started:
            yield WRITING
        yield await room.outcome()

    @staticmethod
    def abandon(room: Room, decode_id: str) -> None:
        """The decode's Transfer call ended before the room did (cancelled, disconnected)."""
        room.fail(AbortedError(f"bootstrap room {room.id}: decode {decode_id} cancelled it"))
