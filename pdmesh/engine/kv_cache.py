"""The KV cache: its layout (``KVLayout``, what a transfer engine needs to write pages as raw
bytes) and where its memory comes from.

On CUDA the cache is allocated in one of torch's *expandable segments* — memory made with the
CUDA virtual-memory API (``cuMemCreate``) — instead of a plain ``cudaMalloc`` block. The cache
is the memory another process on the host writes into (the ``cuda_ipc`` KV-transfer backend),
and how it was allocated decides how fast that can go: a peer that maps ``cudaMalloc`` memory
through a legacy CUDA IPC handle copies into it at host-staged speed (measured 40 GB/s between
two H200s, NVLink-connected), while the same copy into cuMem memory, shared as a POSIX file
descriptor, runs at the link's 390 GB/s, as fast as a copy between two GPUs of one process
(``python -m benchmarks.kv_transfer --device cuda:0 --receiver-device cuda:1``).

Only the cache is allocated that way: the allocator setting is switched on around this one
allocation and restored, so activations, weights and CUDA-graph pools stay as they were.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _set_allocator(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # torch < 2.9
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)


def _expandable_by_env() -> bool:
    """Whether the operator already made every allocation expandable (then leave it so)."""
    conf = ",".join(os.environ.get(name, "") for name in _ENV)
    return re.search(r"expandable_segments:\s*true", conf, re.IGNORECASE) is not None


@contextmanager
def _expandable_segments() -> Iterator[bool]:
    """Allocations inside go to expandable (cuMem) segments; yields whether that took."""
    if _expandable_by_env():
        yield True
        return
    try:
        _set_allocator("expandable_segments:True")
    except (AttributeError, RuntimeError) as e:
        log.warning(
            "could not allocate the KV cache as shareable CUDA memory (%s): a same-host peer "
            "writing into it (cuda_ipc) will copy at host-staged speed",
            e,
        )
        yield False
        return
    try:
        yield True
    finally:
        _set_allocator("expandable_segments:False")


def allocate_kv_cache(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """A zeroed cache of ``shape``; on CUDA in memory a peer process can map at link speed.

    Zeroed: padded decode rows read slots nobody wrote, and 0 x garbage may be NaN.
    """
    if device.type != "cuda":
        return torch.zeros(shape, dtype=dtype, device=device)
    with torch.cuda.device(device), _expandable_segments() as shareable:
        # a free block the allocator still caches would be reused as it is (cudaMalloc memory)
        torch.cuda.empty_cache()
        kv = torch.zeros(shape, dtype=dtype, device=device)
    if shareable and not in_expandable_segment(kv):
        log.warning(
            "the KV cache was placed in cudaMalloc memory: a same-host peer writing into it "
            "(cuda_ipc) will copy at host-staged speed"
        )
    return kv


def in_expandable_segment(t: torch.Tensor) -> bool:
    """Whether ``t`` lives in an expandable (cuMem) segment, i.e. shares at link speed."""
    if not t.is_cuda:
        return False
    ptr = t.untyped_storage().data_ptr()
    for seg in torch.cuda.memory_snapshot():
        if (
            seg["device"] == t.device.index
            and seg["address"] <= ptr < seg["address"] + seg["total_size"]
        ):
            return bool(seg.get("is_expandable", False))
    return False


PAGE_MAJOR = "page_major"


@dataclass(frozen=True)
class KVLayout:
    """Where every KV page lives, for a transfer engine that writes raw bytes.

    The cache is one contiguous buffer ``[num_pages, num_layers, 2, page_size, kv_heads,
    head_dim]`` (page-major): page ``p`` with every layer's K and V is the ``page_bytes`` starting
    at ``base_ptr + p * page_bytes``, and consecutive pages are consecutive bytes.
    """

    base_ptr: int
    total_bytes: int
    num_layers: int
    num_pages: int
    page_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    device: str
    # the dimension order above; a peer that lays its cache out otherwise is incompatible
    order: str = PAGE_MAJOR

    @property
    def page_bytes(self) -> int:
        """Bytes of one page: every layer, K and V."""
        return self.total_bytes // self.num_pages

    def page_addr(self, page: int) -> int:
        return self.base_ptr + page * self.page_bytes

    def compatibility_errors(self, other: KVLayout) -> list[str]:
        """Mismatches that make a page of ``other`` unreadable as a page of ``self``."""
        fields = ("order", "page_size", "dtype", "num_layers", "num_kv_heads", "head_dim")
        return [
            f"{f}: {_shown(getattr(self, f))} != {_shown(getattr(other, f))}"
            for f in fields
            if getattr(self, f) != getattr(other, f)
        ]


def _shown(value: object) -> object:
    # a peer from before a field existed sends its zero value: say so rather than print nothing
    return value if value not in ("", 0) else "(not set)"
