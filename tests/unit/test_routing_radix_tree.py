from __future__ import annotations

from pdmesh.routing import RadixTree


def test_insert_and_match_a_prefix() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], "a")
    assert tree.prefix_match([1, 2, 3, 4, 5]) == (4, {"a"})
    assert tree.prefix_match([1, 2, 9]) == (2, {"a"})  # a partial edge counts
    assert tree.prefix_match([9]) == (0, set())
    assert tree.prefix_match([]) == (0, set())
    assert tree.tenant_size("a") == 4


def test_shared_prefixes_split_edges_and_count_per_tenant() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3, 4], "a")
    tree.insert([1, 2, 5, 6], "b")
    tree.insert([1, 2, 3, 7], "b")
    assert tree.prefix_match([1, 2]) == (2, {"a", "b"})
    assert tree.prefix_match([1, 2, 3, 4]) == (4, {"a"})
    assert tree.prefix_match([1, 2, 3, 7, 8]) == (4, {"b"})
    assert tree.match_per_tenant([1, 2, 3, 4]) == {"a": 4, "b": 3}
    assert tree.tenant_size("a") == 4
    assert tree.tenant_size("b") == 6  # [1, 2] + [5, 6] + [3] + [7]
    tree.insert([1, 2, 3, 4], "a")  # re-inserting adds nothing
    assert tree.tenant_size("a") == 4


def test_evict_removes_least_recently_used_leaves_per_tenant() -> None:
    tree = RadixTree()
    tree.insert([0] * 10 + [1] * 10, "a")  # oldest
    tree.insert([0] * 10 + [2] * 10, "a")
    tree.insert([3] * 10, "a")  # newest
    tree.insert([0] * 10 + [1] * 10, "b")
    assert tree.tenant_size("a") == 40
    tree.evict(max_size=30)
    assert tree.tenant_size("a") == 30
    assert tree.match_per_tenant([0] * 10 + [1] * 10)["a"] == 10  # the oldest leaf went
    assert tree.match_per_tenant([0] * 10 + [2] * 10)["a"] == 20
    assert tree.match_per_tenant([3] * 10)["a"] == 10
    assert tree.tenant_size("b") == 20  # other tenants keep theirs
    assert tree.match_per_tenant([0] * 10 + [1] * 10)["b"] == 20


def test_evict_refreshes_recency_on_reinsert_and_prunes_parents() -> None:
    tree = RadixTree()
    tree.insert([1] * 5 + [2] * 5, "a")
    tree.insert([7] * 5, "a")
    tree.insert([1] * 5 + [2] * 5, "a")  # now the newest
    tree.evict(max_size=10)
    assert tree.match_per_tenant([7] * 5)["a"] == 0
    assert tree.match_per_tenant([1] * 5 + [2] * 5)["a"] == 10
    tree.evict(max_size=0)
    assert tree.tenant_size("a") == 0
    assert tree.node_count() == 1  # only the root is left


def test_remove_tenant_keeps_the_others_and_prunes_empty_nodes() -> None:
    tree = RadixTree()
    tree.insert([1, 2, 3], "a")
    tree.insert([1, 2, 4], "b")
    tree.insert([5, 6], "a")
    tree.remove_tenant("a")
    assert tree.tenants() == ["b"]
    assert tree.prefix_match([1, 2, 3]) == (2, {"b"})
    assert tree.prefix_match([5, 6]) == (0, set())
    assert tree.tenant_size("b") == 3
    tree.remove_tenant("b")
    tree.remove_tenant("never-seen")
    assert tree.node_count() == 1
