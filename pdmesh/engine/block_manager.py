"""Page allocation and the prefix cache: page ids, ref counts, hashes — no tensors.

NOTE: the KV cache is split into ``num_pages`` fixed pages of ``page_size`` tokens. A sequence's
``block_table`` lists its pages in order. A page that is full of computed KV gets a content hash
chained over all earlier pages (so equal hashes mean an equal prefix, not just an equal page);
hashed pages stay addressable after their last owner frees them, parked in an LRU list, and a
later request with the same prefix takes them back instead of recomputing. Free capacity is the
free list plus that LRU list: a fresh allocation evicts the least recently freed cached page.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass

from pdmesh.engine.sequence import Sequence


@dataclass(frozen=True)
class PrefixCacheStats:
    hit_tokens: int
    miss_tokens: int
    cached_pages: int  # pages holding reusable KV (in use or parked in the LRU)

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0


class BlockManager:
    def __init__(self, num_pages: int, page_size: int, enable_prefix_cache: bool = True) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages={num_pages} and page_size={page_size} must be > 0")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref_counts = [0] * num_pages
        self._free: deque[int] = deque(range(num_pages))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but hashed; LRU first
        self._page_hash: list[int | None] = [None] * num_pages
        self._hash_to_page: dict[int, int] = {}
        self._seq_hashes: dict[str, list[int]] = {}  # request id -> hashes of its full pages
        self.hit_tokens = 0
        self.miss_tokens = 0

    # -- capacity -------------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self._free) + len(self._evictable)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - self.num_free_pages

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(self.hit_tokens, self.miss_tokens, len(self._hash_to_page))

    # -- admission ------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int]) -> list[int]:
        """Cached pages holding a prefix of ``token_ids`` (read only, no ref taken).

        The last token is never matched: a step must compute at least one token to sample.
        """
        if not self.enable_prefix_cache:
            return []
        pages: list[int] = []
        h = 0
        for i in range((len(token_ids) - 1) // self.page_size):
            h = _page_hash(h, token_ids[i * self.page_size : (i + 1) * self.page_size])
            page = self._hash_to_page.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def can_allocate(self, seq: Sequence) -> bool:
        cached = self.match_prefix(seq.token_ids)
        # cached pages parked in the LRU leave the free pool when reused
        parked = sum(1 for p in cached if self.ref_counts[p] == 0)
        needed = self.pages_for(seq.num_tokens) - len(cached)
        return needed + parked <= self.num_free_pages

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` pages for all its tokens, reusing cached prefix pages."""
        assert not seq.block_table, f"{seq.request_id} already holds pages"
        assert self.can_allocate(seq), f"{seq.request_id}: not enough free pages"
        cached = self.match_prefix(seq.token_ids)
        for page in cached:
            self._take(page)
        seq.block_table = cached + [
            self._alloc_fresh() for _ in range(self.pages_for(seq.num_tokens) - len(cached))
        ]
        self._seq_hashes[seq.request_id] = [self._page_hash[p] or 0 for p in cached]
        seq.num_cached_tokens = len(cached) * self.page_size
        seq.num_computed_tokens = seq.num_cached_tokens
        if seq.num_preemptions == 0:  # a recompute after preemption is not a new lookup
            self.hit_tokens += seq.num_cached_tokens
            self.miss_tokens += seq.num_prompt_tokens - seq.num_cached_tokens

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) - len(seq.block_table) <= self.num_free_pages

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Ensure ``seq`` has pages for its first ``num_tokens`` tokens."""
        assert self.can_grow(seq, num_tokens), f"{seq.request_id}: not enough free pages"
        while len(seq.block_table) * self.page_size < num_tokens:
            seq.block_table.append(self._alloc_fresh())

    # -- bookkeeping after a step ---------------------------------------------------------

    def commit_full_pages(self, seq: Sequence) -> None:
        """Hash the pages of ``seq`` that are now full of computed KV so others can reuse them."""
        if not self.enable_prefix_cache:
            return
        hashes = self._seq_hashes.setdefault(seq.request_id, [])
        h = hashes[-1] if hashes else 0
        for i in range(len(hashes), seq.num_computed_tokens // self.page_size):
            h = _page_hash(h, seq.token_ids[i * self.page_size : (i + 1) * self.page_size])
            hashes.append(h)
            page = seq.block_table[i]
            if h not in self._hash_to_page and self._page_hash[page] is None:
                self._hash_to_page[h] = page
                self._page_hash[page] = h

    def free(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; pages nobody holds become free or parked in the LRU."""
        # tail pages first, so the LRU evicts a prefix's tail before its head
        for page in reversed(seq.block_table):
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, f"page {page} freed twice"
            if self.ref_counts[page] == 0:
                if self._page_hash[page] is not None:
                    self._evictable[page] = None
                else:
                    self._free.append(page)
        seq.block_table = []
        self._seq_hashes.pop(seq.request_id, None)

    # -- internals ------------------------------------------------------------------------

    def _take(self, page: int) -> None:
        if self.ref_counts[page] == 0:
            del self._evictable[page]
        self.ref_counts[page] += 1

    def _alloc_fresh(self) -> int:
        if self._free:
            page = self._free.popleft()
        else:
            page, _ = self._evictable.popitem(last=False)
            h = self._page_hash[page]
            self._page_hash[page] = None
            if h is not None:
                del self._hash_to_page[h]
        assert self.ref_counts[page] == 0
        self.ref_counts[page] = 1
        return page


def _page_hash(prev: int, tokens: list[int]) -> int:
    return hash((prev, tuple(tokens)))
