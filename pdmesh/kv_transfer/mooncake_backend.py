"""The ``mooncake`` backend: one-sided writes with the Mooncake transfer engine.

Each side runs its own ``TransferEngine`` in ``P2PHANDSHAKE`` mode (no metadata server: peers
swap segment descriptors over the engine's RPC port) and registers its whole KV cache, the
sender's too, since Mooncake only moves bytes between registered regions. A write submits the
coalesced blocks and waits for them on a thread under the write's deadline (``MooncakeSender``
says where each step runs, and why it does not use ``batch_transfer_sync_write`` by default).

The protocol is ``mooncake_transport``'s choice (``--kv-transfer-protocol auto`` by default:
rdma where the kernel lists RDMA devices, tcp elsewhere); ``rdma`` with no device found falls
back to tcp inside Mooncake, which is detected from Mooncake's topology and logged, and every
handle carries the transport its engine really runs (a sender refuses a receiver on the other).
``tcp`` works anywhere, DRAM to DRAM. On CUDA hosts with a CUDA build of Mooncake the KV
cache's device pointer is registered as it is: Mooncake looks the pointer up itself
(``cudaPointerGetAttributes``), so rdma writes GPU to GPU (GPUDirect) and tcp stages through
host memory. That path is not exercised on the CPU-only machines the tests run on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats, check_cache
from pdmesh.kv_transfer.mooncake_transport import (
    DEFAULT_PROTOCOL,
    RDMA,
    effective_transport,
    pair_refusal,
    plan_transport,
)
from pdmesh.kv_transfer.mooncake_waiter import TIMED_OUT, TransferWaiter

log = logging.getLogger(__name__)

# Read by Mooncake when an engine starts; an operator's own setting wins (setdefault).
ENV_DEFAULTS = {
    # INFO logs a dozen lines per engine start on stderr
    "MC_LOG_LEVEL": "WARNING",
    # a peer that stops reading (SIGSTOP, hung host) otherwise holds a write thread for 30 s
    # after our deadline has already failed the room; 5 s without any progress means dead
    "MC_TCP_PROGRESS_TIMEOUT_SEC": "5",
}

_SLACK_S = 0.5
_POLL_S = 200e-6  # draining given-up transfers at close
# transfer_submit_write returns -1 (as uint64) or 0 when the peer's segment cannot be opened
_BAD_BATCH_IDS = (0, -1, 2**64 - 1)


_MIN_PIECE = 256 << 10
# Parts per block (env PDMESH_MOONCAKE_SPLIT overrides). 2-core loopback, page-major rooms, vs a
# raw socket copy of the same bytes (python -m benchmarks.kv_transfer --backends mooncake,raw),
# interleaved runs: 4 parts 0.73-0.96 at 1.4-2.8 MiB and 0.64-0.67 at 11 MiB; 1-3 parts
# 0.52-0.65 and 0.38-0.52; 6-8 parts 0.69-0.89 and 0.60-0.68, no better than 4 (Mooncake's
# default of 4 lanes per peer).
DEFAULT_SPLIT = 4
ENV_SPLIT = "PDMESH_MOONCAKE_SPLIT"


def split_blocks(blocks: list[tuple[int, int, int]], pieces: int) -> list[tuple[int, int, int]]:
    """Cut each block into up to ``pieces`` parts of at least 256 KiB: Mooncake's tcp
    transport moves one task over one connection in 64 KiB steps, so one long block (a page-major
    room) uses one of the peer's lanes; parts go out on several."""
    if pieces <= 1:
        return blocks
    out = []
    for s, d, n in blocks:
        k = max(1, min(pieces, n // _MIN_PIECE))
        step = -(-n // k)
        out += [(s + o, d + o, min(step, n - o)) for o in range(0, n, step)]
    return out


def start_engine(host: str, protocol: str, device_name: str) -> Any:
    """A started ``TransferEngine`` listening on ``host`` (its RPC port is picked from
    ``MC_MIN_RPC_PORT``..``MC_MAX_RPC_PORT``, 15000..17000 unless set)."""
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise KVTransferError(
            f"the mooncake KV-transfer backend needs the Mooncake transfer engine ({e}); "
            "install it with scripts/install_mooncake.sh, or use the grpc backend"
        ) from e
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    engine = TransferEngine()
    rc = engine.initialize(host, "P2PHANDSHAKE", protocol, device_name)
    if rc != 0:
        raise KVTransferError(
            f"mooncake TransferEngine.initialize({host!r}, 'P2PHANDSHAKE', {protocol!r}, "
            f"{device_name!r}) returned {rc}",
            peer=host,
        )
    return engine


def open_engine(host: str, protocol: str, ib_device: str, side: str) -> tuple[Any, str]:
    """A started engine for ``--kv-transfer-protocol`` ``protocol`` and
    ``--disaggregation-ib-device`` ``ib_device``, and the transport it runs ("tcp" or "rdma");
    one log line says which and why (a warning when rdma was asked for and Mooncake fell back)."""
    plan = plan_transport(protocol, ib_device)
    engine = start_engine(host, plan.protocol, plan.device_name)
    topology = ""
    if plan.protocol == RDMA:
        try:
            topology = str(engine.get_local_topology(plan.device_name))
        except Exception as e:  # an older binding: cannot tell, trust the request
            topology = f"<{e}>"
    transport, reason = effective_transport(plan, topology)
    if plan.requested == RDMA and transport != RDMA:
        log.warning("mooncake KV %s on %s: transport %s (%s)", side, host, transport, reason)
    else:
        log.info("mooncake KV %s on %s: transport %s (%s)", side, host, transport, reason)
    return engine, transport


def register(engine: Any, kv_cache: torch.Tensor, host: str) -> None:
    # GPU tensors too: see the module docstring
    rc = engine.register_memory(kv_cache.data_ptr(), kv_cache.nbytes)
    if rc != 0:
        raise KVTransferError(
            f"mooncake register_memory of {kv_cache.nbytes} bytes ({kv_cache.device}) returned {rc}",
            peer=host,
        )


class MooncakeReceiver(KVReceiver):
    backend = "mooncake"

    def __init__(self, kv_cache: torch.Tensor, engine: Any, handle: ReceiverHandle) -> None:
        self.kv_cache = kv_cache  # held: Mooncake writes into this memory
        self._engine: Any = engine
        self._handle = handle

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        protocol: str = DEFAULT_PROTOCOL,
        device_name: str = "",
    ) -> MooncakeReceiver:
        """``host`` must be an address the prefill workers reach (not 0.0.0.0); ``protocol``:
        auto, rdma or tcp; ``device_name``: RDMA devices, comma-separated ("" = any)."""
        check_cache(kv_cache, layout)
        engine, transport = open_engine(host, protocol, device_name, "receiver")
        register(engine, kv_cache, host)
        session = f"{host}:{engine.get_rpc_port()}"
        handle = ReceiverHandle("mooncake", session, uuid.uuid4().hex, layout, transport=transport)
        return cls(kv_cache, engine, handle)

    @property
    def handle(self) -> ReceiverHandle:
        return self._handle

    def close(self) -> None:
        if self._engine is not None:
            self._engine.unregister_memory(self.kv_cache.data_ptr())
            self._engine = None  # the engine stops its threads when collected


class MooncakeSender(KVSender):
    """Pushes pages with Mooncake.

    ``wait="poll"`` (the default) submits each block as a one-task transfer on the event loop's
    own thread and awaits one future that ``TransferWaiter``'s thread resolves once they have
    all ended (``mooncake_waiter`` says why one thread polls for every write). A submit only
    queues the blocks for Mooncake's I/O thread (~15 us for 4 blocks) and never blocks once the
    receiver's segment is open, so the bytes start moving in the write call itself. The first
    write to a receiver is submitted from a pool thread instead: opening the segment is a
    blocking handshake with the receiver. Before, every write submitted and waited on a pool
    thread, a hop there and back: writes of 1.4-2.8 MiB rooms took 5-15% longer (alike from
    11 MiB; ``python -m benchmarks.kv_transfer --backends mooncake,raw``, the old and new
    sender interleaved in one process). Waiting on the loop's own thread, with no hop at all,
    was as fast as the waiter within the runs' noise: what remains is Mooncake's own
    (docs/benchmarks.md, "KV transfer on CPU loopback").

    ``wait="sync"`` makes one ``batch_transfer_sync_write`` call on the pool instead, whose
    wait spins a core: on a 2-core host that core is taken from Mooncake's own I/O threads and
    from the receiver, and rooms of 11-180 MiB moved at ~50% of a thread-based raw socket
    copy's speed against ~65-90% polled; on a 16-core host the two are alike (``python -m
    benchmarks.kv_transfer --backends mooncake,mooncake-sync,raw``). The batch API's status
    calls are no way out: the blocking one spins too, and the non-blocking one reads a batch's
    first task only.
    """

    backend = "mooncake"

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        engine: Any,
        max_workers: int,
        wait: str,
        split: int = 1,
        transport: str = "tcp",
    ) -> None:
        super().__init__(kv_cache, layout)
        self.transport = transport
        self.split = max(1, split)
        if wait not in ("poll", "sync"):
            raise ValueError(f"wait={wait!r}; choose 'poll' or 'sync'")
        self.wait = wait
        self._engine: Any = engine
        self._closing = False
        # first writes to a receiver and sync writes; our own pool: a write stuck on a hung
        # peer must not starve the loop's default executor
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="mooncake-write")
        self._waiter = TransferWaiter(engine.transfer_check_status)
        # receivers whose segment Mooncake has opened: submits to them no longer block
        self._opened: set[str] = set()

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        protocol: str = DEFAULT_PROTOCOL,
        device_name: str = "",
        max_workers: int = 4,
        wait: str = "poll",
        split: int = 0,
    ) -> MooncakeSender:
        check_cache(kv_cache, layout)
        engine, transport = open_engine(host, protocol, device_name, "sender")
        register(engine, kv_cache, host)
        split = split or int(os.environ.get(ENV_SPLIT, DEFAULT_SPLIT))
        return cls(kv_cache, layout, engine, max_workers, wait, split, transport)

    def refusal(self, dest: ReceiverHandle) -> str | None:
        return super().refusal(dest) or pair_refusal(dest.transport, self.transport)

    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        if self._closing:
            raise KVTransferError("mooncake sender is closed", peer=dest.address)
        blocks = split_blocks(self.plan(dest, src_pages, dst_pages), self.split)
        nbytes = sum(length for _, _, length in blocks)
        start = time.perf_counter()
        if blocks:
            src = [self.layout.base_ptr + s for s, _, _ in blocks]
            dst = [dest.base_ptr + d for _, d, _ in blocks]
            lengths = [length for _, _, length in blocks]
            if self.wait == "sync":
                rc = await self._write_sync(dest.address, src, dst, lengths, timeout)
            else:
                rc = await self._write_polled(dest.address, src, dst, lengths, timeout)
            if rc == TIMED_OUT:
                raise KVTransferError(
                    f"mooncake write of {nbytes} bytes to {dest.address} did not finish within "
                    f"{timeout:g} s",
                    peer=dest.address,
                )
            if rc != 0:
                raise KVTransferError(
                    f"mooncake write of {nbytes} bytes ({len(blocks)} blocks) to {dest.address} "
                    f"failed with return code {rc} (receiver gone or unreachable?)",
                    peer=dest.address,
                )
        return TransferStats(
            nbytes, len(src_pages), len(blocks), time.perf_counter() - start, self.backend
        )

    async def _write_polled(
        self, session: str, src: list[int], dst: list[int], lengths: list[int], timeout: float
    ) -> int:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        if session in self._opened:
            batch_ids, rc = self._submit(session, src, dst, lengths)
            ended = self._waiter.add(loop, batch_ids, rc, deadline)
        else:
            opening = loop.run_in_executor(
                self._pool, self._submit_opening, loop, session, src, dst, lengths, deadline
            )
            try:
                # shield: a timeout must not cancel the future of a thread that still runs; what
                # it submits late is still waited for (and given up at its deadline)
                ended = await asyncio.wait_for(asyncio.shield(opening), timeout)
            except asyncio.TimeoutError:
                return TIMED_OUT
        # no timeout here: the waiter resolves the future by the deadline itself
        return await ended

    def _submit_opening(
        self,
        loop: asyncio.AbstractEventLoop,
        session: str,
        src: list[int],
        dst: list[int],
        lengths: list[int],
        deadline: float,
    ) -> asyncio.Future[int]:
        """The first write to ``session``, on the pool: its submit opens the receiver's
        segment, a handshake that blocks."""
        if time.monotonic() > deadline:  # queued behind other handshakes past its deadline
            return self._waiter.add(loop, [], TIMED_OUT, deadline)
        batch_ids, rc = self._submit(session, src, dst, lengths)
        if rc == 0:
            self._opened.add(session)
        return self._waiter.add(loop, batch_ids, rc, deadline)

    def _submit(
        self, session: str, src: list[int], dst: list[int], lengths: list[int]
    ) -> tuple[list[int], int]:
        """Queue one transfer per block; returns their batch ids and 0, or -1 when the
        receiver's segment cannot be opened (nothing more is submitted then, but the blocks
        already queued still read our memory and must be waited for)."""
        batch_ids: list[int] = []
        for s, d, n in zip(src, dst, lengths):
            batch_id = self._engine.transfer_submit_write(session, s, d, n)
            if batch_id in _BAD_BATCH_IDS:
                return batch_ids, -1
            batch_ids.append(batch_id)
        return batch_ids, 0

    async def _write_sync(
        self, session: str, src: list[int], dst: list[int], lengths: list[int], timeout: float
    ) -> int:
        call = partial(self._engine.batch_transfer_sync_write, session, src, dst, lengths)
        fut = asyncio.get_running_loop().run_in_executor(self._pool, call)
        try:
            # shield: a timeout must not cancel the future of a thread that still runs
            return int(await asyncio.wait_for(asyncio.shield(fut), timeout + _SLACK_S))
        except asyncio.TimeoutError:
            return TIMED_OUT  # the thread runs on until MC_TCP_PROGRESS_TIMEOUT_SEC

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        # unregistering memory a transfer still reads from would be a use-after-free: wait
        # for the pool's writes (they may hand transfers to the waiter), then for the waiter's
        await loop.run_in_executor(None, self._pool.shutdown, True)
        await loop.run_in_executor(None, self._waiter.stop)
        await loop.run_in_executor(None, self._drain_abandoned)
        self._engine.unregister_memory(self.kv_cache.data_ptr())
        self._engine = None

    def _drain_abandoned(self) -> None:
        # a peer that stops reading makes Mooncake fail the transfer after
        # MC_TCP_PROGRESS_TIMEOUT_SEC; this waits that long at most (plus slack)
        limit = time.monotonic() + float(os.environ.get("MC_TCP_PROGRESS_TIMEOUT_SEC", "30")) + 2
        for batch_id in self._waiter.abandoned:
            while self._engine.transfer_check_status(batch_id) == 0:
                if time.monotonic() > limit:
                    return
                time.sleep(_POLL_S)
