"""What travels between the two sides: the receiver's handle and a write's figures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmesh.engine.kv_cache import KVLayout


@dataclass(frozen=True)
class ReceiverHandle:
    """Everything a sender needs to write into one receiver's KV cache.

    The decode worker sends it to each prefill it registers with. ``address`` is where the
    backend reaches the receiver (mooncake: its session ``host:rpc_port``; grpc: the ``host:port``
    of the server hosting ``pdmesh.v1.KVReceiverService``). ``receiver_id`` is fresh for every
    ``open``: a receiver restarted behind the same address gets a new one, so a sender holding
    the old handle is refused instead of writing into memory laid out for someone else.
    """

    backend: str
    address: str
    receiver_id: str
    layout: KVLayout
    # what only this backend needs (cuda_ipc: the shared memory handle, JSON)
    extra: bytes = b""
    # mooncake: the transport its engine runs, "tcp" or "rdma" ("" means tcp: older peers)
    transport: str = ""

    @property
    def base_ptr(self) -> int:
        return self.layout.base_ptr


@dataclass(frozen=True)
class TransferStats:
    """One ``KVSender.write``: payload bytes, pages, (src, dst, len) blocks after coalescing,
    wall seconds from the call to the receiver's acknowledgement, and GB/s (1e9 bytes/s)."""

    bytes: int
    pages: int
    blocks: int
    seconds: float
    backend: str

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


def layout_of(kv_cache: torch.Tensor) -> KVLayout:
    """The ``KVLayout`` of a ``[pages, layers, 2, page_size, kv_heads, head_dim]`` tensor (what
    ``LLMEngine.kv_layout()`` returns for the engine's own cache)."""
    if kv_cache.dim() != 6 or kv_cache.shape[2] != 2:
        raise ValueError(
            f"kv_cache must be [pages, layers, 2, page_size, kv_heads, head_dim], "
            f"got shape {tuple(kv_cache.shape)}"
        )
    pages, layers, _, page_size, heads, head_dim = kv_cache.shape
    return KVLayout(
        base_ptr=kv_cache.data_ptr(),
        total_bytes=kv_cache.nbytes,
        num_layers=layers,
        num_pages=pages,
        page_size=page_size,
        num_kv_heads=heads,
        head_dim=head_dim,
        dtype=str(kv_cache.dtype).removeprefix("torch."),
        device=str(kv_cache.device),
    )


def check_cache(kv_cache: torch.Tensor, layout: KVLayout) -> None:
    """Refuse a layout that does not describe ``kv_cache`` (a backend writes raw bytes at the
    layout's addresses, so a stale or foreign layout would corrupt memory)."""
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous: pages are addressed as raw byte ranges")
    if layout.base_ptr != kv_cache.data_ptr() or layout.total_bytes != kv_cache.nbytes:
        raise ValueError(
            f"layout (base_ptr={layout.base_ptr:#x}, total_bytes={layout.total_bytes}) does not "
            f"describe kv_cache (data_ptr={kv_cache.data_ptr():#x}, nbytes={kv_cache.nbytes})"
        )
    itemsize = kv_cache.element_size()
    page_bytes = layout.num_layers * 2 * layout.page_size * layout.num_kv_heads * layout.head_dim
    if layout.total_bytes != page_bytes * itemsize * layout.num_pages:
        raise ValueError(
            f"layout total_bytes={layout.total_bytes} is not "
            "pages*layers*2*page_size*kv_heads*head_dim*itemsize"
        )
