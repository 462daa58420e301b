"""``kv_cost``: Dynamo's KV-router cost, on pdmesh's approximate radix tree.

For each candidate: ``prefill_blocks`` = blocks of the prompt not already cached there
(prompt blocks minus overlap blocks, overlap from the tree), ``decode_blocks`` = blocks of the
requests it is running (router-tracked active tokens, or its in-flight count when no tokens are
tracked), and ``cost = overlap_score_weight * prefill_blocks + decode_blocks``.

Temperature 0 takes the argmin; ties go to the lower load, then the smaller tree, then a seeded
random pick (Dynamo breaks ties by tree size then randomly; load first answers its users'
hot-spotting reports). Temperature T > 0 samples with ``p_i ∝ exp(-(c_i - c_min) /
((c_max - c_min) * T))`` (min-max normalised costs, uniform when all are equal).
The prompt is then inserted under the chosen worker, as ``cache_aware`` does.
"""

from __future__ import annotations

import math
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

DEFAULT_BLOCK_SIZE = 16  # pdmesh's default --page-size
DEFAULT_OVERLAP_SCORE_WEIGHT = 1.0  # Dynamo's --kv-overlap-score-weight default
DEFAULT_TEMPERATURE = 0.0  # Dynamo's --router-temperature default
DEFAULT_MAX_TREE_SIZE = 1 << 20  # Dynamo's max tree (blocks there; tokens here)
DEFAULT_EVICTION_INTERVAL_SECS = 120.0  # Dynamo's --router-ttl-secs


@dataclass(frozen=True)
class KvCostConfig:
    block_size: int = DEFAULT_BLOCK_SIZE
    overlap_score_weight: float = DEFAULT_OVERLAP_SCORE_WEIGHT
    temperature: float = DEFAULT_TEMPERATURE
    eviction_interval_secs: float = DEFAULT_EVICTION_INTERVAL_SECS
    max_tree_size: int = DEFAULT_MAX_TREE_SIZE * DEFAULT_BLOCK_SIZE

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size={self.block_size} must be > 0")
        if self.overlap_score_weight < 0 or self.temperature < 0:
            raise ValueError("overlap_score_weight and temperature must be >= 0")


class KvCost(PrefixTreePolicy):
    name = "kv_cost"

    def __init__(
        self,
        config: KvCostConfig | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or KvCostConfig()
        super().__init__(self.config.eviction_interval_secs, self.config.max_tree_size, rng, clock)
        self.last_matched_tokens = 0

    def costs(
        self, candidates: Sequence[K], tokens: Sequence[int], loads: Mapping[K, WorkerLoad] | None
    ) -> list[float]:
        bs = self.config.block_size
        prompt_blocks = math.ceil(len(tokens) / bs)
        matches = self.tree.match_per_tenant(tokens)
        out = []
        for c in candidates:
            overlap_blocks = matches.get(c, 0) // bs  # only whole cached pages save a prefill
            load = load_of(loads, c)
            decode_blocks = (
                math.ceil(load.active_tokens / bs) if load.active_tokens else load.in_flight
            )
            prefill_blocks = prompt_blocks - overlap_blocks
            out.append(self.config.overlap_score_weight * prefill_blocks + decode_blocks)
        return out

    def select(
        self,
        candidates: Sequence[K],
        request: RequestView = NO_REQUEST,
        loads: Mapping[K, WorkerLoad] | None = None,
    ) -> K:
        check_candidates(candidates)
        self._maybe_evict()
        tokens = request.token_ids
        costs = self.costs(candidates, tokens, loads)
        if self.config.temperature > 0:
            choice = candidates[softmax_pick(costs, self.config.temperature, self._rng)]
        else:
            low = min(costs)
            tied = [c for c, cost in zip(candidates, costs, strict=True) if cost == low]
            choice = self._least_loaded(tied, loads)
        self.last_matched_tokens = self.tree.match_per_tenant(tokens).get(choice, 0)
        self.tree.insert(tokens, choice)
        return choice


def softmax_pick(costs: Sequence[float], temperature: float, rng: random.Random) -> int:
    """Index sampled with ``p_i ∝ exp(-(c_i - c_min) / ((c_max - c_min) * T))``."""
    lo, hi = min(costs), max(costs)
    if hi == lo:
        return rng.randrange(len(costs))
    weights = [math.exp(-(c - lo) / ((hi - lo) * temperature)) for c in costs]
    return rng.choices(range(len(costs)), weights=weights)[0]
