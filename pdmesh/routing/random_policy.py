"""``random``: a uniformly random candidate (the baseline every other policy must beat)."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

from pdmesh.routing.policy import (
    NO_REQUEST,
    K,
    RequestView,
    RoutingPolicy,
    WorkerLoad,
    check_candidates,
)


class RandomPolicy(RoutingPolicy):
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(
        self,
        candidates: Sequence[K],
        request: RequestView = NO_REQUEST,
        loads: Mapping[K, WorkerLoad] | None = None,
    ) -> K:
        check_candidates(candidates)
        return candidates[self._rng.randrange(len(candidates))]
