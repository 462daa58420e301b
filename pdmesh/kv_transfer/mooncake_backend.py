"""The ``mooncake`` backend: one-sided writes with the Mooncake transfer engine.

Each side runs its own ``TransferEngine`` in ``P2PHANDSHAKE`` mode (no metadata server: peers
swap segment descriptors over the engine's RPC port) and registers its whole KV cache, the
sender's too, since Mooncake only moves bytes between registered regions. A write submits the
coalesced blocks and waits for them on a thread under the write's deadline (``MooncakeSender``
says why it does not use ``batch_transfer_sync_write`` by default).

Protocol ``tcp`` (the default) works anywhere, DRAM to DRAM; ``rdma`` needs NICs and falls back
to tcp inside Mooncake when none are found. On CUDA hosts with a CUDA build of Mooncake the KV
cache's device pointer is registered as it is: Mooncake looks the pointer up itself
(``cudaPointerGetAttributes``), so rdma writes GPU to GPU (GPUDirect) and tcp stages through
host memory. That path is not exercised on the CPU-only machines the tests run on.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import torch

from pdmesh.engine.outputs import KVLayout
from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats, check_cache

# Read by Mooncake when an engine starts; an operator's own setting wins (setdefault).
ENV_DEFAULTS = {
    # INFO logs a dozen lines per engine start on stderr
    "MC_LOG_LEVEL": "WARNING",
    # a peer that stops reading (SIGSTOP, hung host) otherwise holds a write thread for 30 s
    # after our deadline has already failed the room; 5 s without any progress means dead
    "MC_TCP_PROGRESS_TIMEOUT_SEC": "5",
}

_TIMED_OUT = -1000  # our own code for "the deadline passed" (Mooncake's codes are -1, -2)
_SLACK_S = 0.5
_POLL_MIN_S = 20e-6
_POLL_MAX_S = 200e-6
# transfer_submit_write returns -1 (as uint64) or 0 when the peer's segment cannot be opened
_BAD_BATCH_IDS = (0, -1, 2**64 - 1)


_MIN_PIECE = 256 << 10
# Parts per block (env PDMESH_MOONCAKE_SPLIT overrides). 2-core loopback, page-major rooms, vs a
# raw socket copy of the same bytes (python -m pdmesh.bench.kv_transfer --backends mooncake,raw):
# 1 part: 0.52-0.54 at 2.8-11 MiB, 0.75 at 45 MiB; 4 parts: 0.72-0.95 at 2.8 MiB, 0.92-1.26 at
# 11-45 MiB; 8 parts: no better than 4.
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
        protocol: str = "tcp",
        device_name: str = "",
    ) -> MooncakeReceiver:
        """``host`` must be an address the prefill workers reach (not 0.0.0.0)."""
        check_cache(kv_cache, layout)
        engine = start_engine(host, protocol, device_name)
        register(engine, kv_cache, host)
        session = f"{host}:{engine.get_rpc_port()}"
        return cls(kv_cache, engine, ReceiverHandle("mooncake", session, uuid.uuid4().hex, layout))

    @property
    def handle(self) -> ReceiverHandle:
        return self._handle

    def close(self) -> None:
        if self._engine is not None:
            self._engine.unregister_memory(self.kv_cache.data_ptr())
            self._engine = None  # the engine stops its threads when collected


class MooncakeSender(KVSender):
    """Pushes pages with Mooncake.

    ``wait="poll"`` (the default) submits each block as a one-task transfer and waits for them
    on a thread that checks their status and sleeps in between (20 us growing to 0.2 ms).
    ``wait="sync"`` makes one ``batch_transfer_sync_write`` call instead, whose wait spins a
    core: on a 2-core host that core is taken from Mooncake's own I/O threads and from the
    receiver, and rooms of 11-180 MiB moved at ~50% of a raw socket copy's speed against
    ~65-90% polled; on a 16-core host the two are alike (``python -m pdmesh.bench.kv_transfer
    --backends mooncake,mooncake-sync,raw``). The batch API's status calls are no way out: the
    blocking one spins too, and the non-blocking one reads a batch's first task only.
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
    ) -> None:
        super().__init__(kv_cache, layout)
        self.split = max(1, split)
        if wait not in ("poll", "sync"):
            raise ValueError(f"wait={wait!r}; choose 'poll' or 'sync'")
        self.wait = wait
        self._engine: Any = engine
        # our own pool: a write stuck on a hung peer must not starve the loop's default executor
        self._pool = ThreadPoolExecutor(max_workers, thread_name_prefix="mooncake-write")
        # transfers given up at their deadline: Mooncake may still read our memory for them
        self._abandoned: list[int] = []
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        protocol: str = "tcp",
        device_name: str = "",
        max_workers: int = 4,
        wait: str = "poll",
        split: int = 0,
    ) -> MooncakeSender:
        check_cache(kv_cache, layout)
        engine = start_engine(host, protocol, device_name)
        register(engine, kv_cache, host)
        split = split or int(os.environ.get(ENV_SPLIT, DEFAULT_SPLIT))
        return cls(kv_cache, layout, engine, max_workers, wait, split)

    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        if self._engine is None:
            raise KVTransferError("mooncake sender is closed", peer=dest.address)
        blocks = split_blocks(self.plan(dest, src_pages, dst_pages), self.split)
        nbytes = sum(length for _, _, length in blocks)
        start = time.perf_counter()
        if blocks:
            src = [self.layout.base_ptr + s for s, _, _ in blocks]
            dst = [dest.base_ptr + d for _, d, _ in blocks]
            lengths = [length for _, _, length in blocks]
            rc = await self._run(dest.address, src, dst, lengths, timeout)
            if rc == _TIMED_OUT:
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

    async def _run(
        self, session: str, src: list[int], dst: list[int], lengths: list[int], timeout: float
    ) -> int:
        loop = asyncio.get_running_loop()
        if self.wait == "sync":
            call = partial(self._engine.batch_transfer_sync_write, session, src, dst, lengths)
        else:
            deadline = time.monotonic() + timeout
            call = partial(self._submit_and_poll, session, src, dst, lengths, deadline)
        fut = loop.run_in_executor(self._pool, call)
        try:
            # shield: a timeout must not cancel the future of a thread that still runs. The
            # polled wait ends at its deadline by itself; the slack only lets it say so.
            return int(await asyncio.wait_for(asyncio.shield(fut), timeout + _SLACK_S))
        except asyncio.TimeoutError:
            return _TIMED_OUT  # sync: the thread runs on until MC_TCP_PROGRESS_TIMEOUT_SEC

    def _submit_and_poll(
        self, session: str, src: list[int], dst: list[int], lengths: list[int], deadline: float
    ) -> int:
        engine = self._engine
        if engine is None or time.monotonic() > deadline:  # closed, or queued past its deadline
            return _TIMED_OUT
        pending: deque[int] = deque()
        rc = 0
        for s, d, n in zip(src, dst, lengths):
            batch_id = engine.transfer_submit_write(session, s, d, n)
            if batch_id in _BAD_BATCH_IDS:  # segment unreachable: nothing more will go
                rc = -1
                break
            pending.append(batch_id)
        # in order: blocks finish roughly in submission order, so each wait covers most of them
        pause = _POLL_MIN_S
        while pending:
            status = engine.transfer_check_status(pending[0])
            if status == 0:  # still running
                if time.monotonic() > deadline:
                    with self._lock:
                        self._abandoned.extend(pending)
                    return _TIMED_OUT
                time.sleep(pause)
                pause = min(pause * 2, _POLL_MAX_S)
                continue
            if status == -2:  # Mooncake's own timeout; its batch is not freed by the check
                with self._lock:
                    self._abandoned.append(pending[0])
            pending.popleft()  # done or failed: Mooncake freed the batch
            if status != 1 and rc == 0:
                rc = status
        return rc

    async def close(self) -> None:
        if self._engine is None:
            return
        loop = asyncio.get_running_loop()
        # unregistering memory a transfer still reads from would be a use-after-free
        await loop.run_in_executor(None, self._pool.shutdown, True)
        await loop.run_in_executor(None, self._drain_abandoned)
        self._engine.unregister_memory(self.kv_cache.data_ptr())
        self._engine = None

    def _drain_abandoned(self) -> None:
        # a peer that stops reading makes Mooncake fail the transfer after
        # MC_TCP_PROGRESS_TIMEOUT_SEC; this waits that long at most (plus slack)
        limit = time.monotonic() + float(os.environ.get("MC_TCP_PROGRESS_TIMEOUT_SEC", "30")) + 2
        with self._lock:
            pending, self._abandoned = self._abandoned, []
        for batch_id in pending:
            while self._engine.transfer_check_status(batch_id) == 0:
                if time.monotonic() > limit:
                    return
                time.sleep(_POLL_MAX_S)
