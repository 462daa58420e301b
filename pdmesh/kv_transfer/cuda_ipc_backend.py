"""The ``cuda_ipc`` backend: prefill and decode on GPUs of one host, pages copied device to
device over NVLink/PCIe peer access.

The decode worker shares its KV cache with CUDA IPC (the memory handle torch's own
multiprocessing uses) and sends it inside its receiver handle; the prefill worker maps that
memory once per receiver and each write is one ``cudaMemcpyAsync`` per coalesced block on a
stream of its own, waited for on a thread under the write's deadline. No bytes go through the
host, no NIC is involved: it runs at the link's speed (390 GB/s between two H200s, 1.0x a copy
between two GPUs of one process), where Mooncake's tcp transport stages every byte through host
memory and sockets (~2 GB/s).

The link's speed needs the cache in cuMem memory (``pdmesh.engine.kv_cache``), shared as a
POSIX file descriptor that the mapping process takes with ``pidfd_getfd``: legacy
``cudaMalloc`` IPC handles measured 40 GB/s on the same machine. The receiver therefore lets
any process of its user take that descriptor where the Yama LSM would only allow its ancestors
(``ptrace_scope`` 1: the prefill is a sibling, not a parent).

Same host only: the handle carries the host's boot id, and a sender on another host refuses it
at registration. GPUs are matched by UUID, not index, so the two processes may see different
``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import json
import logging
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from pdmesh.engine.kv_cache import KVLayout, in_expandable_segment
from pdmesh.kv_transfer import page_copy
from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats, check_cache

BACKEND = "cuda_ipc"
# up to this many runs of pages a write is a DMA copy per run (390 GB/s on H200s); more go
# through page_copy's kernel (370 GB/s, but one launch however scattered the pages are)
_DMA_MAX_BLOCKS = 4
log = logging.getLogger(__name__)

_PR_SET_PTRACER = 0x59616D61
_PR_SET_PTRACER_ANY = ctypes.c_ulong(-1)
_YAMA_SCOPE = Path("/proc/sys/kernel/yama/ptrace_scope")


def host_id() -> str:
    """This host (boot), so that a handle is only used where its memory exists."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _need_cuda(kv_cache: torch.Tensor) -> None:
    if not kv_cache.is_cuda:
        raise KVTransferError(
            f"the cuda_ipc KV-transfer backend needs the KV cache in GPU memory "
            f"(it is on {kv_cache.device}); use mooncake or grpc"
        )


def _allow_peers_to_map() -> None:
    """Let a sibling process take this process's cuMem descriptors (``pidfd_getfd``).

    Yama's ``ptrace_scope`` 1 (Ubuntu's default) only lets ancestors do that; 2 and 3 need
    privileges no serving process should have, and then the mapping fails with an error saying
    so at the prefill.
    """
    try:
        scope = int(_YAMA_SCOPE.read_text())
    except (OSError, ValueError):
        return  # no Yama: same-user processes may already
    if scope == 1:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PTRACER, _PR_SET_PTRACER_ANY, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PTRACER) failed (errno %d)", ctypes.get_errno())


def _share(kv_cache: torch.Tensor) -> bytes:
    device, handle, size, offset, ref_handle, ref_offset, event, event_sync = (
        kv_cache.untyped_storage()._share_cuda_()  # type: ignore[attr-defined]
    )
    fields = {
        "host": host_id(),
        "gpu_uuid": str(torch.cuda.get_device_properties(device).uuid),
        "handle": base64.b64encode(handle).decode(),
        "size": size,
        "offset": offset,
        "ref_handle": base64.b64encode(ref_handle).decode(),
        "ref_offset": ref_offset,
        "event": base64.b64encode(event).decode(),
        "event_sync": bool(event_sync),
        # where the cache starts inside the shared allocation
        "storage_offset": kv_cache.storage_offset() * kv_cache.element_size(),
        # cuMem memory (link speed) or a legacy cudaMalloc block (host-staged copies)
        "link_speed": in_expandable_segment(kv_cache),
    }
    # JSON, not pickle: the prefill must never unpickle what a peer sent
    return json.dumps(fields).encode()


def _local_index(gpu_uuid: str) -> int | None:
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == gpu_uuid:
            return i
    return None


def _fields(dest: ReceiverHandle) -> dict[str, Any]:
    try:
        fields = json.loads(dest.extra)
    except ValueError as e:
        raise KVTransferError(
            f"cuda_ipc handle of {dest.address} is malformed", peer=dest.address
        ) from e
    if not isinstance(fields, dict) or not {"host", "gpu_uuid", "handle"} <= fields.keys():
        raise KVTransferError(f"cuda_ipc handle of {dest.address} is malformed", peer=dest.address)
    return fields


def _unreachable(fields: dict[str, Any]) -> str | None:
    """Why this process cannot map the memory ``fields`` describe, None if it can."""
    if fields["host"] != host_id():
        return (
            f"its cuda_ipc memory is on another host ({fields['host']}); cuda_ipc works between "
            "GPUs of one host: use mooncake across hosts"
        )
    if _local_index(fields["gpu_uuid"]) is None:
        return (
            f"its cuda_ipc memory is on GPU {fields['gpu_uuid']}, which this process does not see "
            "(CUDA_VISIBLE_DEVICES?)"
        )
    return None


def _open_remote(dest: ReceiverHandle) -> torch.Tensor:
    """The receiver's cache as a flat uint8 tensor in this process."""
    f = _fields(dest)
    reason = _unreachable(f)
    if reason is not None:
        raise KVTransferError(f"cuda_ipc receiver {dest.address}: {reason}", peer=dest.address)
    index = _local_index(f["gpu_uuid"])
    assert index is not None
    if not f.get("link_speed", False):
        log.warning(
            "cuda_ipc receiver %s shares its KV cache as legacy cudaMalloc memory: copies into "
            "it run at host-staged speed (~40 GB/s measured, not the link's)",
            dest.address,
        )
    b64 = base64.b64decode
    try:
        with torch.cuda.device(index):
            storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
                index,
                b64(f["handle"]),
                f["size"],
                f["offset"],
                b64(f["ref_handle"]),
                f["ref_offset"],
                b64(f["event"]),
                f["event_sync"],
            )
            flat = torch.empty(0, dtype=torch.uint8, device=f"cuda:{index}").set_(storage)
    except RuntimeError as e:
        raise KVTransferError(
            f"cannot map the KV cache of cuda_ipc receiver {dest.address}: {e} (cuMem memory "
            "is taken with pidfd_getfd, which needs the same user and, under Yama, "
            "kernel.yama.ptrace_scope <= 1)",
            peer=dest.address,
        ) from e
    start = f["storage_offset"]
    return flat[start : start + dest.layout.total_bytes]


class CudaIpcReceiver(KVReceiver):
    backend = BACKEND

    def __init__(self, kv_cache: torch.Tensor, handle: ReceiverHandle) -> None:
        self.kv_cache = kv_cache  # held: the prefill writes into this memory
        self._handle = handle

    @classmethod
    def open(cls, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> CudaIpcReceiver:
        _need_cuda(kv_cache)
        check_cache(kv_cache, layout)
        _allow_peers_to_map()
        handle = ReceiverHandle(BACKEND, host, uuid.uuid4().hex, layout, _share(kv_cache))
        return cls(kv_cache, handle)

    @property
    def handle(self) -> ReceiverHandle:
        return self._handle

    def close(self) -> None:
        pass  # the memory lives as long as the engine's cache; nothing was registered


class CudaIpcSender(KVSender):
    backend = BACKEND

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        super().__init__(kv_cache, layout)
        self._flat = kv_cache.view(torch.uint8).reshape(-1)
        self._remotes: dict[str, torch.Tensor] = {}  # by receiver_id
        self._stream = torch.cuda.Stream(kv_cache.device)
        # one thread: copies to one GPU queue on one stream anyway; the thread only waits
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cuda-ipc-write")

    @classmethod
    def open(cls, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> CudaIpcSender:
        _need_cuda(kv_cache)
        check_cache(kv_cache, layout)
        return cls(kv_cache, layout)

    def refusal(self, dest: ReceiverHandle) -> str | None:
        reason = super().refusal(dest)
        if reason is None:
            try:
                reason = _unreachable(_fields(dest))
            except KVTransferError as e:
                reason = str(e)
        return reason

    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        blocks = self.plan(dest, src_pages, dst_pages)
        remote = self._remotes.get(dest.receiver_id)
        if remote is None:
            remote = self._remotes[dest.receiver_id] = _open_remote(dest)
        nbytes = sum(n for _, _, n in blocks)
        loop = asyncio.get_running_loop()
        start = loop.time()
        fut = loop.run_in_executor(self._pool, self._copy, remote, blocks)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            raise KVTransferError(
                f"cuda_ipc write of {nbytes} bytes to {dest.address} did not finish within "
                f"{timeout:g} s",
                peer=dest.address,
            ) from None
        return TransferStats(nbytes, len(src_pages), len(blocks), loop.time() - start, BACKEND)

    def _copy(self, remote: torch.Tensor, blocks: list[tuple[int, int, int]]) -> None:
        # No wait on the engine's stream: a prefill's pages are final once its output is out,
        # because every engine step ends in a host sync (the sampler reads the tokens), and
        # they stay held until the write is done. Waiting on the stream would also wait for
        # the prefill chunks of later requests queued behind them.
        with torch.cuda.device(self.kv_cache.device), torch.cuda.stream(self._stream):
            if len(blocks) <= _DMA_MAX_BLOCKS or not page_copy.available():
                for s, d, n in blocks:
                    remote[d : d + n].copy_(self._flat[s : s + n], non_blocking=True)
            else:  # scattered pages: one launch, not one GIL-bound call per run
                page_copy.copy_pages(self._flat, remote, blocks, self.layout.page_bytes)
        self._stream.synchronize()

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._pool.shutdown, True)
        self._remotes.clear()
