"""``DisaggDecoder``: the decode worker's half of one disaggregated request.

    allocate pages (retrying while none are free) ─► register with the prefill (once per prefill)
    ─► Transfer(room, pages) ─► done{first token} ─► start_decode ─► stream like aggregated

The receive phase (allocation to first token) runs as its own task, so that however the
Generate call ends (client cancel, router cancel, deadline), that task decides when the pages
may be freed. It races the Transfer call against: the heartbeat (the prefill is lost or
restarted), ``--waiting-timeout`` (counted from the request's arrival), and a cancel. No token is
ever emitted before ``done``, so nothing is decoded from incomplete KV.

NOTE on freeing pages: once the prefill said ``writing``, its writes may be landing in this
request's pages. Freeing them then would let the next request's KV be overwritten by a late
write, so on a cancel or timeout in that state the task waits for the Transfer to end (the
prefill answers only after its write ended; bounded by the heartbeat and one more waiting
timeout) before it aborts the request. A lost prefill frees at once: it writes no more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from pdmesh.engine import AsyncEngine
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.outputs import RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.errors import AbortedError, DeadlineExceededError, ResourceExhaustedError
from pdmesh.pd.heartbeat import HeartbeatMonitor, Watch
from pdmesh.pd.peers import PrefillPeers
from pdmesh.pd.values import FirstToken, RemotePrefill

log = logging.getLogger(__name__)
T = TypeVar("T")

_ALLOC_RETRY_S = (0.01, 0.25)  # first and longest pause between tries when no pages are free


@dataclass(eq=False)
class _Incoming:
    request_id: str
    prefill: RemotePrefill
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    writing: bool = False  # the prefill started writing into our pages


class DisaggDecoder:
    def __init__(
        self,
        engine: AsyncEngine,
        layout: KVLayout,
        peers: PrefillPeers,
        monitor: HeartbeatMonitor,
        waiting_timeout: float,
    ) -> None:
        self._engine = engine
        self._layout = layout
        self._peers = peers
        self._monitor = monitor
        self._waiting_timeout = waiting_timeout
        self._incoming: dict[str, _Incoming] = {}  # requests in their receive phase
        self.total_rooms = 0  # disaggregated requests since start
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def num_rooms(self) -> int:
        """Requests waiting for their KV."""
        return len(self._incoming)

    async def generate(
        self,
        request_id: str,
        prompt: list[int],
        params: SamplingParams,
        prefill: RemotePrefill,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a disaggregated request: the first output carries the prefill's token."""
        if request_id in self._incoming:
            raise AbortedError(f"request {request_id!r} is still being torn down; retry later")
        incoming = _Incoming(request_id, prefill)
        self._incoming[request_id] = incoming
        self.total_rooms += 1
        receive = self._spawn(self._receive(incoming, prompt, params))
        try:
            first = await asyncio.shield(receive)
        except asyncio.CancelledError:
            incoming.cancelled.set()  # the task frees the pages when it safely can
            raise
        outputs = cast(
            AsyncGenerator[RequestOutput, None],
            self._engine.decode_incoming(request_id, first.token_id, first.logprob),
        )
        async with contextlib.aclosing(outputs):  # closing early aborts the request
            async for out in outputs:
                # the prompt was computed on the prefill: its prefix-cache hits are the ones
                out.num_cached_tokens = first.num_cached_tokens
                yield out

    def cancel(self, request_id: str) -> bool:
        """Stop ``request_id`` if it is still waiting for its KV (its Generate call ended
        early, or an Abort RPC): its receive task frees the pages once no write can land in
        them any more. False if it is not waiting (decoding, done or unknown): the caller
        aborts it in the engine."""
        incoming = self._incoming.get(request_id)
        if incoming is None:
            return False
        incoming.cancelled.set()
        return True

    async def close(self) -> None:
        for incoming in list(self._incoming.values()):
            incoming.cancelled.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- the receive phase ------------------------------------------------------------------

    async def _receive(
        self, incoming: _Incoming, prompt: list[int], params: SamplingParams
    ) -> FirstToken:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._waiting_timeout
        try:
            pages = await self._allocate(incoming, prompt, params, deadline)
            try:
                first = await self._transfer(incoming, pages, deadline)
                if incoming.cancelled.is_set():  # cancelled just as the KV arrived
                    raise AbortedError(f"request {incoming.request_id!r} was cancelled")
                return first
            except BaseException:
                self._engine.abort_soon(incoming.request_id)
                raise
        finally:
            del self._incoming[incoming.request_id]

    async def _allocate(
        self, incoming: _Incoming, prompt: list[int], params: SamplingParams, deadline: float
    ) -> list[int]:
        """Pages for the prompt; waits (bounded) while the pool is full."""
        loop = asyncio.get_running_loop()
        pause = _ALLOC_RETRY_S[0]
        while True:
            try:
                # a grammar is compiled (off the engine thread) before any page is allocated
                return await self._engine.allocate_incoming(incoming.request_id, prompt, params)
            except ResourceExhaustedError:
                if self._never_fits(len(prompt)) or loop.time() + pause > deadline:
                    raise
            if await _wait_event(incoming.cancelled, pause):
                raise AbortedError(f"request {incoming.request_id!r} was cancelled")
            pause = min(pause * 2, _ALLOC_RETRY_S[1])

    def _never_fits(self, num_prompt_tokens: int) -> bool:
        # the engine's own check: the prompt and one generated token must fit in the whole pool
        pages = -(-(num_prompt_tokens + 1) // self._layout.page_size)
        return pages > self._layout.num_pages

    async def _transfer(self, incoming: _Incoming, pages: list[int], deadline: float) -> FirstToken:
        prefill = incoming.prefill
        peer = self._peers.get(prefill.bootstrap_address)
        loop = asyncio.get_running_loop()
        # watched from the start: a prefill that hangs while we register must fail the room too
        watch = self._monitor.watch(prefill.bootstrap_address)

        def writing() -> None:
            incoming.writing = True
            # the instance that took the room: from now on another instance answering the
            # heartbeat means the room's KV is gone. Not the instance cached before the
            # transfer: a prefill restarted behind the same address answers the transfer with
            # NOT_FOUND and the peer registers again, so the cache may be one instance old.
            watch.instance_id = peer.instance_id

        try:
            await self._race(incoming, self._spawn(peer.ensure_registered()), watch, deadline)
            transfer = self._spawn(
                peer.transfer(
                    prefill.room,
                    pages,
                    incoming.request_id,
                    on_writing=writing,
                    # the grpc deadline is a backstop; the waiting timeout acts first
                    timeout=max(0.0, deadline - loop.time()) + self._waiting_timeout,
                )
            )
            try:
                return await self._race(incoming, transfer, watch, deadline)
            except BaseException:
                if incoming.writing and not watch.lost.done():
                    # see the module's NOTE: let the write end before the pages are freed
                    ends: set[asyncio.Future[Any]] = {transfer, watch.lost}
                    await asyncio.wait(ends, timeout=self._waiting_timeout)
                raise
            finally:
                transfer.cancel()  # a no-op once done; otherwise the prefill aborts the room
        finally:
            self._monitor.release(watch)

    async def _race(
        self, incoming: _Incoming, task: asyncio.Task[T], watch: Watch, deadline: float
    ) -> T:
        """``task``'s result, unless the prefill is lost, the request is cancelled or the
        deadline passes first (then the reason is raised; ``task`` is left to the caller)."""
        cancelled = self._spawn(incoming.cancelled.wait())
        try:
            waiters: set[asyncio.Future[Any]] = {task, watch.lost, cancelled}
            timeout = max(0.0, deadline - asyncio.get_running_loop().time())
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if task.done():
            return task.result()
        if watch.lost.done():
            raise watch.lost.exception() or AssertionError("lost without a reason")
        label = incoming.prefill.label
        if incoming.cancelled.is_set():
            raise AbortedError(
                f"request {incoming.request_id!r} was cancelled while waiting for {label}"
            )
        raise DeadlineExceededError(
            f"bootstrap room {incoming.prefill.room}: the KV from {label} did not arrive within "
            f"{self._waiting_timeout:g}s (--waiting-timeout)"
        )

    def _spawn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._forget)
        return task

    def _forget(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: whoever awaited it has it, or nobody needs it


async def _wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` for ``event``; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except TimeoutError:
        return False
    return True
