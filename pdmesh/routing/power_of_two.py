"""``power_of_two``: sample two distinct candidates, take the less loaded (SGLang's
``power_of_two``). Two random probes avoid both herding onto one "least loaded" worker whose
load report is stale and the cost of ranking every worker, yet keep the max load close to
the ideal (the "power of two choices")."""

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
    load_key,
)


class PowerOfTwo(RoutingPolicy):
    name = "power_of_two"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def select(
        self,
        candidates: Sequence[K],
        request: RequestView = NO_REQUEST,
        loads: Mapping[K, WorkerLoad] | None = None,
    ) -> K:
        check_candidates(candidates)
        if len(candidates) == 1:
            return candidates[0]
        i, j = self._rng.sample(range(len(candidates)), 2)
        a, b = candidates[i], candidates[j]
        # a tie keeps the first probe, which is itself random: no bias to either position
        return b if load_key(loads, b) < load_key(loads, a) else a
