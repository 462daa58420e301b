"""Turning page-id lists into as few byte-range copies as possible.

With the page-major ``[pages, layers, 2, ...]`` layout, a page holds every layer's K and V and
pages ``p`` and ``p + 1`` are adjacent in memory. A run of pages that is consecutive on *both*
sides is therefore a single copy, and a room whose pages are contiguous on both sides costs one
block however long it is. Each (src, dst, len) block costs a work request in Mooncake and a
segment header in the grpc stream, so fewer, longer blocks move faster.
"""

from __future__ import annotations

from pdmesh.engine.kv_cache import KVLayout

Block = tuple[int, int, int]  # (src byte offset, dst byte offset, length), from each base


def page_runs(src_pages: list[int], dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """Maximal runs ``(src_first, dst_first, count)`` that are consecutive on both sides."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_pages, dst_pages, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def coalesce(
    layout: KVLayout,
    src_pages: list[int],
    dst_pages: list[int],
    dst_layout: KVLayout | None = None,
) -> list[Block]:
    """Byte blocks copying ``src_pages[i]`` of ``layout`` onto ``dst_pages[i]`` of
    ``dst_layout`` (default: the same layout), for every layer and both K and V.

    Offsets are relative to each side's ``base_ptr``; blocks come in page order.
    """
    dst_layout = dst_layout or layout
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages but {len(dst_pages)} destination pages")
    if errors := layout.compatibility_errors(dst_layout):
        raise ValueError("incompatible KV layouts: " + "; ".join(errors))
    _check_pages("source", src_pages, layout.num_pages)
    _check_pages("destination", dst_pages, dst_layout.num_pages)
    if len(set(dst_pages)) != len(dst_pages):
        raise ValueError("destination pages repeat: two source pages would land on one page")

    page_bytes = layout.page_bytes
    return [
        (s * page_bytes, d * page_bytes, n * page_bytes)
        for s, d, n in page_runs(src_pages, dst_pages)
    ]


def _check_pages(side: str, pages: list[int], num_pages: int) -> None:
    for p in pages:
        if not 0 <= p < num_pages:
            raise ValueError(f"{side} page {p} is outside [0, {num_pages})")
