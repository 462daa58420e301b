"""Policies by ``--policy`` name. Each factory takes the tunables of every policy (a policy
ignores the others), a ``random.Random`` (seed it for reproducible picks) and a clock."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pdmesh.routing.cache_aware import CacheAware, CacheAwareConfig
from pdmesh.routing.kv_cost import KvCost, KvCostConfig
from pdmesh.routing.policy import RoundRobin, RoutingPolicy
from pdmesh.routing.power_of_two import PowerOfTwo
from pdmesh.routing.random_policy import RandomPolicy

Clock = Callable[[], float]


@dataclass(frozen=True)
class PolicySettings:
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    kv_cost: KvCostConfig = field(default_factory=KvCostConfig)


Factory = Callable[[PolicySettings, random.Random, Clock], RoutingPolicy]

POLICIES: dict[str, Factory] = {
    "random": lambda s, rng, clock: RandomPolicy(rng),
    "round_robin": lambda s, rng, clock: RoundRobin(),
    "power_of_two": lambda s, rng, clock: PowerOfTwo(rng),
    "cache_aware": lambda s, rng, clock: CacheAware(s.cache_aware, rng, clock),
    "kv_cost": lambda s, rng, clock: KvCost(s.kv_cost, rng, clock),
}


def make_policy(
    name: str,
    settings: PolicySettings | None = None,
    rng: random.Random | None = None,
    clock: Clock = time.monotonic,
) -> RoutingPolicy:
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose {', '.join(POLICIES)}") from None
    return factory(settings or PolicySettings(), rng or random.Random(), clock)
