"""A multi-tenant radix tree over token ids: which worker (tenant) has recently seen which
prompt prefix, so the router can guess whose prefix cache holds a request's prompt.

It is *approximate*: it records what the router sent where, not what the workers actually
keep (they evict on their own), and it forgets on its own schedule: ``evict`` removes each
tenant's least recently used leaves until the tenant holds at most ``max_size`` tokens.

Invariant: a tenant on a node is also on every ancestor of it (insert marks the whole path;
eviction removes a tenant from a node only when no child still has it), so one walk down the
tree yields every tenant's match length. Recency is a counter, not a clock: deterministic,
and all LRU needs is an order.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Node:
    key: tuple[int, ...]  # the edge's tokens from the parent (empty for the root)
    parent: _Node | None
    children: dict[int, _Node] = field(default_factory=dict)  # by first token
    tenants: dict[Hashable, int] = field(default_factory=dict)  # tenant -> last access


class RadixTree:
    def __init__(self) -> None:
        self._root = _Node((), None)
        self._sizes: dict[Hashable, int] = {}  # tokens per tenant
        self._clock = 0

    def tenant_size(self, tenant: Hashable) -> int:
        """Tokens held for ``tenant`` (0 for an unknown one)."""
        return self._sizes.get(tenant, 0)

    def tenants(self) -> list[Hashable]:
        return list(self._sizes)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def insert(self, tokens: Sequence[int], tenant: Hashable) -> None:
        """Record that ``tenant`` has seen ``tokens`` (refreshes recency along the path)."""
        now = self._tick()
        node = self._root
        node.tenants[tenant] = now
        self._sizes.setdefault(tenant, 0)
        tokens = tuple(tokens)
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                child = _Node(tokens[pos:], node)
                node.children[tokens[pos]] = child
            else:
                shared = _common_prefix(child.key, tokens, pos)
                if shared < len(child.key):
                    child = self._split(child, shared)
            if tenant not in child.tenants:
                self._sizes[tenant] += len(child.key)
            child.tenants[tenant] = now
            pos += len(child.key)
            node = child

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut ``node``'s edge after ``at`` tokens; returns the new upper node, which keeps
        every tenant of ``node`` (sizes are unchanged: the same tokens, on two edges)."""
        assert node.parent is not None
        upper = _Node(node.key[:at], node.parent, tenants=dict(node.tenants))
        node.parent.children[upper.key[0]] = upper
        node.key = node.key[at:]
        node.parent = upper
        upper.children[node.key[0]] = node
        return upper

    def prefix_match(self, tokens: Sequence[int]) -> tuple[int, set[Hashable]]:
        """The longest prefix of ``tokens`` any tenant has, and the tenants that have it."""
        matches = self.match_per_tenant(tokens)
        best = max(matches.values(), default=0)
        if best == 0:
            return 0, set()
        return best, {t for t, n in matches.items() if n == best}

    def match_per_tenant(self, tokens: Sequence[int]) -> dict[Hashable, int]:
        """Each tenant's matched prefix length (tenants with no match map to 0)."""
        matched = dict.fromkeys(self._sizes, 0)
        node = self._root
        pos = 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                break
            shared = _common_prefix(child.key, tokens, pos)
            pos += shared
            for tenant in child.tenants:  # a partial edge still counts its shared tokens
                matched[tenant] = pos
            if shared < len(child.key):
                break
            node = child
        return matched

    def evict(self, max_size: int) -> None:
        """Remove each tenant's least recently used leaves until it holds <= ``max_size``."""
        for tenant, size in list(self._sizes.items()):
            if size > max_size:
                self._evict_tenant(tenant, max_size)

    def _evict_tenant(self, tenant: Hashable, max_size: int) -> None:
        heap: list[tuple[int, int, _Node]] = []  # (last access, tiebreak, node)
        for node in self._nodes_of(tenant):
            if node is not self._root and _is_leaf_of(node, tenant):
                heap.append((node.tenants[tenant], id(node), node))
        heapq.heapify(heap)
        while heap and self._sizes[tenant] > max_size:
            _, _, node = heapq.heappop(heap)
            parent = self._drop(node, tenant)
            if parent is not None and parent is not self._root and _is_leaf_of(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], id(parent), parent))

    def _drop(self, node: _Node, tenant: Hashable) -> _Node | None:
        """Take ``tenant`` off ``node`` (pruning the node once nobody has it); its parent."""
        del node.tenants[tenant]
        self._sizes[tenant] -= len(node.key)
        parent = node.parent
        if not node.tenants and parent is not None:
            # no tenant left here means none below either (the invariant): the subtree is empty
            del parent.children[node.key[0]]
        return parent

    def remove_tenant(self, tenant: Hashable) -> None:
        """Forget ``tenant`` entirely (its worker left)."""
        if tenant not in self._sizes:
            return
        # deepest first, so each node is a leaf of the tenant when its turn comes
        for node in reversed(self._nodes_of(tenant)):
            if node is self._root:
                del node.tenants[tenant]
            else:
                self._drop(node, tenant)
        del self._sizes[tenant]

    def _nodes_of(self, tenant: Hashable) -> list[_Node]:
        """Every node holding ``tenant``, parents before children."""
        out: list[_Node] = []
        stack = [self._root] if tenant in self._root.tenants else []
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(c for c in node.children.values() if tenant in c.tenants)
        return out

    def node_count(self) -> int:
        count, stack = 0, [self._root]
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count


def _is_leaf_of(node: _Node, tenant: Hashable) -> bool:
    return all(tenant not in c.tenants for c in node.children.values())


def _common_prefix(key: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    n = min(len(key), len(tokens) - start)
    i = 0
    while i < n and key[i] == tokens[start + i]:
        i += 1
    return i
