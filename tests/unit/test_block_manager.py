from __future__ import annotations

import pytest

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.sequence import Sequence


def seq(rid: str, tokens: list[int]) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams())


def computed(s: Sequence) -> Sequence:
    s.num_computed_tokens = s.num_tokens
    return s


def test_allocate_and_free_returns_every_page() -> None:
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq("a", list(range(10)))  # 3 pages
    bm.allocate(a)
    assert len(a.block_table) == 3 and bm.num_free_pages == 5
    assert [bm.ref_counts[p] for p in a.block_table] == [1, 1, 1]
    bm.free(a)
    assert bm.num_free_pages == 8 and a.block_table == []
    assert all(rc == 0 for rc in bm.ref_counts)


def test_prefix_hit_shares_pages_and_counts() -> None:
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq("a", list(range(10)))
    bm.allocate(a)
    bm.commit_full_pages(computed(a))  # pages 0,1 full; page 2 half
    b = seq("b", list(range(9)) + [99])
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert [bm.ref_counts[p] for p in b.block_table[:2]] == [2, 2]
    assert bm.hit_tokens == 8 and bm.miss_tokens == 10 + 2
    assert bm.stats().hit_rate == pytest.approx(8 / 20)


def test_last_token_is_never_matched() -> None:
    bm = BlockManager(num_pages=8, page_size=4)
    a = seq("a", list(range(8)))
    bm.allocate(a)
    bm.commit_full_pages(computed(a))
    # the same 8 tokens: only the first page may match, the step must compute >= 1 token
    assert len(bm.match_prefix(list(range(8)))) == 1


def test_freed_cached_pages_are_reused_then_evicted_lru() -> None:
    bm = BlockManager(num_pages=4, page_size=2)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.commit_full_pages(computed(a))
    bm.free(a)
    assert bm.num_free_pages == 4 and bm.stats().cached_pages == 2
    b = seq("b", [1, 2, 3, 4, 9])
    assert len(bm.match_prefix(b.token_ids)) == 2
    bm.allocate(b)
    assert b.num_cached_tokens == 4
    bm.free(b)
    # a prompt that needs all four pages evicts the cached ones
    c = seq("c", [7] * 8)
    bm.allocate(c)
    assert bm.num_free_pages == 0 and bm.stats().cached_pages == 0
    assert bm.match_prefix([1, 2, 3, 4, 5]) == []


def test_can_allocate_counts_parked_pages() -> None:
    bm = BlockManager(num_pages=3, page_size=2)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.commit_full_pages(computed(a))
    bm.free(a)
    holder = seq("h", [9, 9])
    bm.allocate(holder)  # takes the one plain free page
    # reusing 2 parked pages + 1 fresh page: parked ones are the only free pages left
    b = seq("b", [1, 2, 3, 4, 6])
    assert not bm.can_allocate(b)


def test_grow_adds_pages_on_page_boundary() -> None:
    bm = BlockManager(num_pages=4, page_size=2)
    a = seq("a", [1, 2])
    bm.allocate(a)
    assert len(a.block_table) == 1
    bm.grow(a, 3)
    assert len(a.block_table) == 2
    bm.grow(a, 4)
    assert len(a.block_table) == 2


def test_disabled_prefix_cache_never_matches() -> None:
    bm = BlockManager(num_pages=8, page_size=2, enable_prefix_cache=False)
    a = seq("a", [1, 2, 3, 4, 5])
    bm.allocate(a)
    bm.commit_full_pages(computed(a))
    assert bm.match_prefix([1, 2, 3, 4, 5]) == []


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_pages=2, page_size=2)
    a = seq("a", [1, 2])
    bm.allocate(a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(a)


def test_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="num_pages"):
        BlockManager(num_pages=0, page_size=4)
