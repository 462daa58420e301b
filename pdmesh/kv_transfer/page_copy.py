# mypy: disable-error-code="no-untyped-def"
# (triton kernels: triton types their arguments itself)
"""Copy scattered KV pages from this GPU into a peer GPU's memory in one kernel launch.

Why: a room's pages are runs of consecutive pages only while the page pools are fresh; after a
while the free lists interleave and a room of 400 pages is 100s of runs. One ``cudaMemcpyAsync``
per run is one Python call per run on the copy thread, and each waits for the GIL the engine's
thread holds: in the 1P1D benchmark on two H200s, rooms of 820 MB took 3.7 ms while the pools
were fresh and ~100 ms once they were not (7.7 GB/s). Here the runs become a list of
(source, destination) page offsets uploaded once, and one kernel on the sender's GPU reads each
page and stores it through the peer mapping over NVLink (a triton copy into CUDA-IPC-imported
cuMem memory ran at 370 GB/s on that machine, a DMA copy at 390).
"""

from __future__ import annotations

import torch

try:  # only CUDA hosts have (and need) triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU hosts
    triton = None

WORD = 8  # bytes moved per element: pages are copied as int64
CHUNK_WORDS = 4096  # 32 KiB per program


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _copy_pages_kernel(
        src_ptr, dst_ptr, src_words_ptr, dst_words_ptr, page_words, CHUNK: tl.constexpr
    ):
        page = tl.program_id(0)
        offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < page_words
        s = tl.load(src_words_ptr + page)
        d = tl.load(dst_words_ptr + page)
        v = tl.load(src_ptr + s + offs, mask=mask, eviction_policy="evict_first")
        tl.store(dst_ptr + d + offs, v, mask=mask)


def copy_pages(
    src: torch.Tensor, dst: torch.Tensor, blocks: list[tuple[int, int, int]], page_bytes: int
) -> None:
    """Copy each block ``(src_byte, dst_byte, nbytes)`` (whole pages) of the flat uint8 ``src``
    (this GPU) into the flat uint8 ``dst`` (a peer's memory), on the current stream."""
    assert page_bytes % WORD == 0
    src_pages: list[int] = []
    dst_pages: list[int] = []
    for s, d, n in blocks:
        for i in range(0, n, page_bytes):
            src_pages.append((s + i) // WORD)
            dst_pages.append((d + i) // WORD)
    offsets = torch.tensor([src_pages, dst_pages], dtype=torch.int64).pin_memory()
    offsets = offsets.to(src.device, non_blocking=True)
    page_words = page_bytes // WORD
    grid = (len(src_pages), triton.cdiv(page_words, CHUNK_WORDS))
    _copy_pages_kernel[grid](
        src.view(torch.int64),
        dst.view(torch.int64),
        offsets[0],
        offsets[1],
        page_words,
        CHUNK=CHUNK_WORDS,
    )
