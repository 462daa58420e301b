"""``RoomTable``: the prefill side's bootstrap rooms, where the two halves of one disaggregated
request meet.

A room is created by whichever half arrives first: the prefill's own Generate (``join_prefill``)
or the decode's Transfer (``join_decode``, with the destination pages). The router sends both at
the same time, so neither may assume the other came first. Every room gets the bootstrap timeout
from its creation: if both halves have not arrived by then it fails (DEADLINE_EXCEEDED), and
every waiter on either side learns it at once.

States only move forward and FAILED is sticky (as SGLang's KVPoll):

    WAITING ──both halves──► READY ──start_write──► WRITING ──finish_write──► DONE
       └──────────────────────┴───────── fail ─────────┴──────────────────────► FAILED

NOTE: a failure while WRITING is only recorded, and the room fails when the write has ended.
The decode frees its pages as soon as it learns the outcome, and a write still landing in freed
pages would corrupt whatever request gets them next.

Rooms leave the table when they end. A failed room's error stays for one bootstrap timeout (a
tombstone), so a half that arrives after the failure fails at once instead of waiting out its
own timeout.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pdmesh.errors import DeadlineExceededError, InvalidRequestError
from pdmesh.pd.values import FirstToken

log = logging.getLogger(__name__)
T = TypeVar("T")


class RoomState(enum.Enum):
    WAITING = "waiting"  # one half arrived
    READY = "ready"  # both halves: the prefill runs or is done, the destination is known
    WRITING = "writing"  # KV pages are being written into the decode's memory
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class Destination:
    """The decode's half of a room: where the KV goes."""

    decode_id: str
    page_ids: tuple[int, ...]
    request_id: str  # the decode's request id, for logs


class Room:
    def __init__(self, room_id: int, on_end: Callable[[Room], None]) -> None:
        loop = asyncio.get_running_loop()
        self.id = room_id
        self.state = RoomState.WAITING
        self.request_id: str | None = None  # the prefill's request, once its Generate joined
        self.error: Exception | None = None
        self.timer: asyncio.TimerHandle | None = None
        self._on_end = on_end
        self._pending_error: Exception | None = None  # a failure that came while WRITING
        self._failed: asyncio.Future[None] = loop.create_future()
        self._destination: asyncio.Future[Destination] = _quiet(loop.create_future())
        self._writing: asyncio.Future[None] = loop.create_future()
        self._outcome: asyncio.Future[FirstToken] = _quiet(loop.create_future())

    def __repr__(self) -> str:
        return f"Room({self.id}, {self.state.value}, request={self.request_id!r})"

    @property
    def is_over(self) -> bool:
        return self.state in (RoomState.DONE, RoomState.FAILED)

    @property
    def has_destination(self) -> bool:
        return self._destination.done() and not self._destination.exception()

    @property
    def writing_started(self) -> bool:
        return self._writing.done()

    # -- the prefill's half -----------------------------------------------------------------

    async def destination(self) -> Destination:
        """The decode's pages, once its Transfer arrived; raises the room's error."""
        return await asyncio.shield(self._destination)

    async def guard(self, aw: Awaitable[T]) -> T:
        """Await ``aw``, but give up (cancel it, raise the room's error) as soon as the room
        fails: a decode that went away must stop the prefill, also mid-prefill."""
        task = asyncio.ensure_future(aw)
        try:
            await _first_of(task, self._failed)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task.done():
            return task.result()
        task.cancel()
        await asyncio.wait({task})  # let it unwind (closing an engine stream aborts the request)
        assert self.error is not None
        raise self.error

    def start_write(self) -> None:
        """The prefill starts writing into the destination; raises the room's error if it
        already failed."""
        if self.state is RoomState.FAILED:
            assert self.error is not None
            raise self.error
        assert self.state is RoomState.READY, self
        self.state = RoomState.WRITING
        self._writing.set_result(None)

    def finish_write(self, first: FirstToken) -> None:
        """The write ended well: the decode may decode from ``first`` (unless the room failed
        meanwhile, which wins)."""
        assert self.state is RoomState.WRITING, self
        if self._pending_error is not None:
            self._end_failed(self._pending_error)
            return
        self.state = RoomState.DONE
        self._outcome.set_result(first)
        self._end()

    def fail_write(self, error: Exception) -> None:
        """The write ended badly (the first recorded failure, if any, is the reason)."""
        assert self.state is RoomState.WRITING, self
        self._end_failed(self._pending_error or error)

    # -- the decode's half ------------------------------------------------------------------

    async def wait_writing(self) -> None:
        """Return once the write started or the room ended."""
        await _first_of(self._writing, self._outcome)

    async def outcome(self) -> FirstToken:
        """The first token once the KV was written; raises the room's error."""
        return await asyncio.shield(self._outcome)

    # -- either side ------------------------------------------------------------------------

    def fail(self, error: Exception) -> bool:
        """Fail the room (no-op once it ended); False if it had already ended. While WRITING
        the failure is recorded and takes effect when the write ends."""
        if self.is_over:
            return False
        if self.state is RoomState.WRITING:
            self._pending_error = self._pending_error or error
            return True
        self._end_failed(error)
        return True

    # -- internals --------------------------------------------------------------------------

    def _set_destination(self, destination: Destination) -> None:
        self._destination.set_result(destination)

    def _end_failed(self, error: Exception) -> None:
        self.state = RoomState.FAILED
        self.error = error
        self._failed.set_result(None)
        for fut in (self._destination, self._outcome):
            if not fut.done():
                fut.set_exception(error)
        self._end()

    def _end(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self._on_end(self)


class RoomTable:
    def __init__(self, bootstrap_timeout: float) -> None:
        """``bootstrap_timeout``: seconds a room may wait for its second half."""
        self.bootstrap_timeout = bootstrap_timeout
        self._rooms: dict[int, Room] = {}  # live rooms
        self.total = 0  # rooms opened since start
        # failed rooms' errors until their expiry (insertion order = expiry order)
        self._tombstones: dict[int, tuple[float, Exception]] = {}

    def __len__(self) -> int:
        return len(self._rooms)

    def get(self, room_id: int) -> Room | None:
        return self._rooms.get(room_id)

    def join_prefill(self, room_id: int, request_id: str) -> Room:
        """The prefill's Generate arrived for ``room_id``."""
        room = self._room(room_id)
        if room.request_id is not None:
            raise InvalidRequestError(
                "disagg.bootstrap_room",
                f"room {room_id} is already taken by request {room.request_id!r}",
            )
        room.request_id = request_id
        self._maybe_ready(room)
        return room

    def join_decode(self, room_id: int, destination: Destination) -> Room:
        """The decode's Transfer arrived for ``room_id`` with its pages."""
        room = self._room(room_id)
        if room.has_destination:
            raise InvalidRequestError("room", f"room {room_id} already has a decode")
        room._set_destination(destination)
        self._maybe_ready(room)
        return room

    def fail_all(self, error: Exception) -> None:
        """Fail every live room (shutdown)."""
        for room in list(self._rooms.values()):
            room.fail(error)

    def _room(self, room_id: int) -> Room:
        self._prune()
        tomb = self._tombstones.get(room_id)
        if tomb is not None:
            raise tomb[1]
        room = self._rooms.get(room_id)
        if room is None:
            room = Room(room_id, self._on_end)
            self.total += 1
            room.timer = asyncio.get_running_loop().call_later(
                self.bootstrap_timeout, self._expire, room
            )
            self._rooms[room_id] = room
        return room

    def _maybe_ready(self, room: Room) -> None:
        if room.state is RoomState.WAITING and room.request_id is not None and room.has_destination:
            room.state = RoomState.READY
            if room.timer is not None:  # both halves are here: the bootstrap is over
                room.timer.cancel()

    def _expire(self, room: Room) -> None:
        if room.state is not RoomState.WAITING:
            return
        missing = (
            "the decode's page ids (Transfer)"
            if not room.has_destination
            else "the prefill request (Generate)"
        )
        log.warning("bootstrap room %d timed out waiting for %s", room.id, missing)
        room.fail(
            DeadlineExceededError(
                f"bootstrap room {room.id}: {missing} did not arrive within "
                f"{self.bootstrap_timeout:g}s (--bootstrap-timeout)"
            )
        )

    def _on_end(self, room: Room) -> None:
        if self._rooms.get(room.id) is room:
            del self._rooms[room.id]
        if room.state is RoomState.FAILED and room.error is not None:
            self._tombstones[room.id] = (time.monotonic() + self.bootstrap_timeout, room.error)

    def _prune(self) -> None:
        now = time.monotonic()
        while self._tombstones:
            room_id, (expiry, _) = next(iter(self._tombstones.items()))
            if expiry > now:
                return
            del self._tombstones[room_id]


async def _first_of(*futures: asyncio.Future[Any]) -> None:
    await asyncio.wait(set(futures), return_when=asyncio.FIRST_COMPLETED)


def _quiet(fut: asyncio.Future[Any]) -> asyncio.Future[Any]:
    # a room's error is often awaited by one half only: don't log "never retrieved" for the other
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())
    return fut
