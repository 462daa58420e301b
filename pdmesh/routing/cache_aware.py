"""``cache_aware``: send a request where its prompt's prefix was sent before (that worker's
prefix cache probably still holds it), unless the fleet is out of balance.

SGLang router's algorithm, over token ids instead of characters:

1. Imbalanced (``max - min > balance_abs_threshold`` and ``max > min * balance_rel_threshold``,
   loads in in-flight requests among the candidates): the least-loaded worker.
2. Else, when the best candidate's match covers more than ``cache_threshold`` of the prompt:
   that candidate (ties: the less loaded).
3. Else (a cache miss): the least-loaded candidate. SGLang originally took the tenant with the
   smallest tree, whatever its load; under a burst of misses that piles every new prompt onto
   one worker (the "death spiral" of SGLang PRs #14305/#14532), so load decides here.

Either way the prompt is then inserted under the chosen worker. Every ``eviction_interval``
seconds (checked on ``select``, on an injectable clock) each worker's tree is cut down to
``max_tree_size`` tokens, least recently used leaves first.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from pdmesh.routing.policy import (
    NO_REQUEST,
    K,
    RequestView,
    WorkerLoad,
    check_candidates,
    load_of,
)
from pdmesh.routing.tree_policy import PrefixTreePolicy

# SGLang router defaults (reference/sglang.md §2)
DEFAULT_CACHE_THRESHOLD = 0.3
DEFAULT_BALANCE_ABS_THRESHOLD = 64
DEFAULT_BALANCE_REL_THRESHOLD = 1.5
DEFAULT_EVICTION_INTERVAL_SECS = 120.0
DEFAULT_MAX_TREE_SIZE = 67_108_864


@dataclass(frozen=True)
class CacheAwareConfig:
    cache_threshold: float = DEFAULT_CACHE_THRESHOLD
    balance_abs_threshold: int = DEFAULT_BALANCE_ABS_THRESHOLD
    balance_rel_threshold: float = DEFAULT_BALANCE_REL_THRESHOLD
    eviction_interval_secs: float = DEFAULT_EVICTION_INTERVAL_SECS
    max_tree_size: int = DEFAULT_MAX_TREE_SIZE

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold={self.cache_threshold} must be in [0, 1]")
        if self.balance_abs_threshold < 0 or self.balance_rel_threshold < 1.0:
            raise ValueError("balance_abs_threshold must be >= 0, balance_rel_threshold >= 1")
        if self.eviction_interval_secs <= 0 or self.max_tree_size < 0:
            raise ValueError("eviction_interval_secs must be > 0, max_tree_size >= 0")


def is_imbalanced(loads: Sequence[int], abs_threshold: float, rel_threshold: float) -> bool:
    lo, hi = min(loads), max(loads)
    return hi - lo > abs_threshold and hi > lo * rel_threshold


class CacheAware(PrefixTreePolicy):
    name = "cache_aware"

    def __init__(
        self,
        config: CacheAwareConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or CacheAwareConfig()
        super().__init__(self.config.eviction_interval_secs, self.config.max_tree_size, rng, clock)
        self.last_match_rate = 0.0  # of the last decision (for metrics and span attributes)
        self.last_matched_tokens = 0

    def select(
        self,
        candidates: Sequence[K],
        request: RequestView = NO_REQUEST,
        loads: Mapping[K, WorkerLoad] | None = None,
    ) -> K:
        check_candidates(candidates)
        self._maybe_evict()
        tokens = request.token_ids
        counts = [load_of(loads, c).in_flight for c in candidates]
        cfg = self.config
        self.last_match_rate, self.last_matched_tokens = 0.0, 0
        if is_imbalanced(counts, cfg.balance_abs_threshold, cfg.balance_rel_threshold):
            choice = self._least_loaded(candidates, loads)
        else:
            matches = self.tree.match_per_tenant(tokens)
            best = max(matches.get(c, 0) for c in candidates)
            rate = best / len(tokens) if tokens else 0.0
            if best > 0 and rate > cfg.cache_threshold:
                self.last_match_rate, self.last_matched_tokens = rate, best
                choice = self._least_loaded(
                    [c for c in candidates if matches.get(c, 0) == best], loads
                )
            else:
                choice = self._least_loaded(candidates, loads)
        self.tree.insert(tokens, choice)
        return choice
