"""``PrefixTreePolicy``: what the cache-aware policies share — a radix tree of the token ids each
worker was sent, evicted on a timer, and tie-breaks that prefer load, then room to cache."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable, Mapping, Sequence

from pdmesh.routing.policy import K, RoutingPolicy, WorkerLoad, load_key
from pdmesh.routing.radix_tree import RadixTree


class PrefixTreePolicy(RoutingPolicy):
    def __init__(
        self,
        eviction_interval_secs: float,
        max_tree_size: int,
        rng: random.Random | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tree = RadixTree()
        self._rng = rng or random.Random()
        self._clock = clock
        self._eviction_interval_secs = eviction_interval_secs
        self._max_tree_size = max_tree_size
        self._last_eviction = clock()

    def _maybe_evict(self) -> None:
        # checked on each selection instead of a background task: no thread, same bound
        now = self._clock()
        if now - self._last_eviction >= self._eviction_interval_secs:
            self._last_eviction = now
            self.tree.evict(self._max_tree_size)

    def _least_loaded(self, candidates: Sequence[K], loads: Mapping[K, WorkerLoad] | None) -> K:
        """Least load; among equals the smallest tree (it has the most room to cache), then a
        seeded random pick (not the first: that would favour one worker on every tie)."""
        best = min(load_key(loads, c) for c in candidates)
        tied = [c for c in candidates if load_key(loads, c) == best]
        smallest = min(self.tree.tenant_size(c) for c in tied)
        tied = [c for c in tied if self.tree.tenant_size(c) == smallest]
        return tied[0] if len(tied) == 1 else tied[self._rng.randrange(len(tied))]

    def remove_worker(self, worker: Hashable) -> None:
        self.tree.remove_tenant(worker)
