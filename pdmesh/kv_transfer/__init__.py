"""Moving KV pages between processes (PD disaggregation).

The decode worker opens a receiver on its KV cache and hands its ``ReceiverHandle`` to each
prefill worker (the worker service puts it on the wire: ``services.worker.kv_convert``); the
prefill worker opens one sender on its own cache and pushes pages straight into the decode's:

    receiver = get_backend("mooncake").receiver.open(kv_cache, engine.kv_layout(), host)
    handle = receiver.handle                                  # → prefill, at registration
    sender = get_backend(handle.backend).sender.open(kv_cache, engine.kv_layout(), host)
    stats = await sender.write(handle, src_pages, dst_pages, timeout=30)  # TransferStats

Backends: ``auto`` (the default: offers ``cuda_ipc`` when the cache is on a GPU, then
``mooncake``, and the sender takes the first it can use), ``cuda_ipc`` (GPU to GPU on one
host), ``mooncake`` (Mooncake transfer engine, tcp or rdma, GPU memory registered directly on
CUDA hosts) and ``grpc`` (bytes streamed to ``pdmesh.v1.KVReceiverService``, for hosts without
Mooncake). They coalesce pages that are consecutive on both sides into one block per (layer,
K/V) (``coalesce``), and raise ``KVTransferError`` naming the peer on failure or deadline.
The plain-TCP copy of the same bytes that the benchmark compares them with is no backend: it
lives in ``benchmarks.kv_reference`` (``python -m benchmarks.kv_transfer``).
"""

from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.coalesce import Block, coalesce, page_runs
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats, layout_of
from pdmesh.kv_transfer.registry import DEFAULT_BACKEND, Backend, backend_names, get_backend

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_TIMEOUT_S",
    "Backend",
    "Block",
    "KVReceiver",
    "KVSender",
    "KVTransferError",
    "ReceiverHandle",
    "TransferStats",
    "backend_names",
    "coalesce",
    "get_backend",
    "layout_of",
    "page_runs",
]
