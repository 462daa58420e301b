"""``PrefillRunner``: the prefill worker's half of one disaggregated request.

    join the room ─► prefill (prefill_only: the engine keeps the pages) ─► the decode's pages
    ─► write the KV into them ─► the room is DONE (the decode gets the first token) ─► release

The prefill starts at once, without waiting for the decode (its metadata usually arrives while
the prompt is computed), as long as the rooms doing so stay within their share of the pool
(``budget``: beyond it, a room waits for its destination first, which keeps full pools on both
sides from waiting on each other). Every wait is bounded: the room's bootstrap timeout covers
the decode's metadata, and a room that fails for any reason (timeout, the decode cancelled, the
transfer failed) stops the prefill where it is and frees its pages.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from pdmesh.engine.async_engine import AsyncEngine
from pdmesh.engine.outputs import RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.errors import AbortedError, FailedPreconditionError, PeerUnavailableError
from pdmesh.kv_transfer import KVSender
from pdmesh.pd.budget import OptimisticBudget
from pdmesh.pd.registry import DecodePeer, DecodeRegistry
from pdmesh.pd.rooms import Destination, Room, RoomTable
from pdmesh.pd.values import FirstToken
from pdmesh.telemetry.spans import KV_TRANSFER, PREFILL
from pdmesh.telemetry.tracing import set_attributes, span

log = logging.getLogger(__name__)
T = TypeVar("T")


class PrefillRunner:
    def __init__(
        self,
        engine: AsyncEngine,
        rooms: RoomTable,
        decodes: DecodeRegistry,
        sender: KVSender,
        transfer_timeout: float,
        budget: OptimisticBudget,
    ) -> None:
        """``transfer_timeout``: seconds one room's KV write may take; ``budget``: pages rooms
        may prefill into before their decode sent its page ids."""
        self._engine = engine
        self._budget = budget
        self._rooms = rooms
        self._decodes = decodes
        self._sender = sender
        self._transfer_timeout = transfer_timeout
        self._live: dict[str, Room] = {}  # rooms of the requests in run(), by request id
        # shielded writes and fire-and-forget aborts, kept alive until they are done
        self._background: set[asyncio.Task[Any]] = set()

    async def run(
        self, request_id: str, prompt: list[int], params: SamplingParams, room_id: int
    ) -> RequestOutput:
        """Prefill ``prompt`` for ``room_id`` and ship its KV; returns the prefill's last output
        (the first token, usage). Raises the room's error; the pages are freed either way."""
        room = self._rooms.join_prefill(room_id, request_id)
        self._live[request_id] = room
        reserved = 0
        try:
            if not room.has_destination:
                reserved = self._budget.try_reserve(len(prompt))
                if not reserved:  # no share left for optimism: wait for the decode first
                    await room.guard(room.destination())
            with span(PREFILL, request_id=request_id, prompt_tokens=len(prompt), room=room_id):
                out = await room.guard(self._prefill(request_id, prompt, params))
                set_attributes(cached_tokens=out.num_cached_tokens)
            destination = await room.guard(room.destination())
            self._budget.release(reserved)
            reserved = 0
            src = _check_pages(room, out, destination)
            peer = self._decodes.get(destination.decode_id)  # the latest registration
            room.start_write()
            write = self._spawn(self._write(room, out, peer, src, destination))
            # shielded: a cancel of this call must not cut the write's bookkeeping short; the
            # room then fails when the write ends (rooms.py says why)
            await asyncio.shield(write)
            await self._engine.call(self._engine.engine.release, request_id)
            return out
        except BaseException as e:
            self._budget.release(reserved)
            room.fail(_room_error(room, e))
            self._abort(request_id)
            raise
        finally:
            del self._live[request_id]

    async def _prefill(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> RequestOutput:
        last: RequestOutput | None = None
        async for out in self._engine.generate(request_id, prompt, params, prefill_only=True):
            last = out
        if last is None or last.prefill_page_ids is None:
            reason = last.finish_reason.value if last and last.finish_reason else "no output"
            raise AbortedError(f"prefill request {request_id!r} ended without KV ({reason})")
        return last

    async def _write(
        self,
        room: Room,
        out: RequestOutput,
        peer: DecodePeer,
        src: list[int],
        destination: Destination,
    ) -> None:
        try:
            with span(KV_TRANSFER, pages=len(src), decode=peer.address):
                stats = await self._sender.write(
                    peer.receiver, src, list(destination.page_ids), timeout=self._transfer_timeout
                )
                set_attributes(bytes=stats.bytes, gbps=stats.gbps, backend=stats.backend)
        except Exception as e:  # KVTransferError names the receiver and what failed
            room.fail_write(
                PeerUnavailableError(
                    f"bootstrap room {room.id}: KV transfer to decode {peer.address} failed: {e}"
                )
            )
            assert room.error is not None
            raise room.error from e
        except BaseException:  # cancelled (shutdown)
            room.fail_write(AbortedError(f"bootstrap room {room.id}: the KV write was cancelled"))
            raise
        first = FirstToken(
            token_id=out.new_token_ids[0],
            logprob=out.new_logprobs[0] if out.new_logprobs else None,
            num_cached_tokens=out.num_cached_tokens,
            num_bytes=stats.bytes,
            seconds=stats.seconds,
        )
        room.finish_write(first)
        log.debug(
            "room %d: %d pages (%d bytes) to %s in %.1f ms (%s, %d runs of pages)",
            room.id,
            len(src),
            stats.bytes,
            peer.address,
            stats.seconds * 1e3,
            stats.backend,
            stats.blocks,
        )

    def abort(self, request_id: str, why: str = "was cancelled") -> bool:
        """Stop ``request_id`` wherever it is (its Generate call ended early, or an Abort
        RPC): fail its room, free its pages. False if it is not running here."""
        room = self._live.get(request_id)
        if room is not None:
            # through the room, so that a write in flight ends before anyone frees pages
            room.fail(AbortedError(f"bootstrap room {room.id}: the prefill request {why}"))
        self._abort(request_id)
        return room is not None

    def _abort(self, request_id: str) -> None:
        # fire and forget: the caller may be a cancelled task that cannot await any more
        self._spawn(self._engine.abort(request_id))

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # a write's error reached the room already; an abort fails only when the engine
            # stopped, which every other call reports
            log.debug("background task failed: %r", task.exception())


def _check_pages(room: Room, out: RequestOutput, destination: Destination) -> list[int]:
    src = list(out.prefill_page_ids or [])
    if len(src) != len(destination.page_ids):
        raise FailedPreconditionError(
            f"bootstrap room {room.id}: the prompt fills {len(src)} KV pages on the prefill but "
            f"the decode sent {len(destination.page_ids)} page ids"
        )
    return src


def _room_error(room: Room, e: BaseException) -> Exception:
    if room.error is not None:
        return room.error
    if isinstance(e, asyncio.CancelledError):
        return AbortedError(
            f"bootstrap room {room.id}: the prefill request {room.request_id!r} was cancelled"
        )
    return AbortedError(f"bootstrap room {room.id}: the prefill failed: {e}")
