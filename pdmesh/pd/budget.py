"""``OptimisticBudget``: how much of the prefill's KV pool may go to rooms whose decode has not
sent its pages yet.

Prefilling before the decode's page ids arrive hides the bootstrap round trips behind the
prompt's compute, but such a prefill then holds its pages until the decode has pages for it.
With both pools full that is a circular wait: the prefill's pages are held by rooms waiting for
the decode, the decode's by rooms whose prefill cannot get pages. Capping the pages that rooms
without a destination may reserve (``share`` of the pool) breaks the cycle: the rest of the pool
always serves rooms whose decode is ready, whose pages come back once their KV is written. A room
that does not fit the cap waits for its destination before it prefills (as SGLang does by
default).
"""

from __future__ import annotations


class OptimisticBudget:
    def __init__(self, num_pages: int, page_size: int, share: float) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"share={share} must be in [0, 1]")
        self.capacity = int(num_pages * share)
        self.page_size = page_size
        self.reserved = 0

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def try_reserve(self, num_tokens: int) -> int:
        """Reserve the pages of a ``num_tokens`` prompt; the count reserved, 0 if it does not
        fit (the room must wait for its destination)."""
        pages = self.pages_for(num_tokens)
        if self.reserved + pages > self.capacity:
            return 0
        self.reserved += pages
        return pages

    def release(self, pages: int) -> None:
        assert 0 <= pages <= self.reserved, (pages, self.reserved)
        self.reserved -= pages
