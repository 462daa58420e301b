"""How the router chooses where a request goes.

``policy``: the ``RoutingPolicy`` interface (candidates + ``RequestView`` + loads → one
candidate) and ``RoundRobin``; ``random_policy``, ``power_of_two``, ``cache_aware`` (on
``radix_tree``) and ``kv_cost``; ``registry``: policies by ``--policy`` name.
``circuit_breaker``: per-worker breakers; ``retry``: backoff, retryable and migrating status codes.
``request``: ``RouteRequest``, what the router decides on; ``attempts``: the one loop of tries
(retries, backoff, breakers, migration) both the aggregated and the disaggregated start run;
``pd_pair``: whether a request is split over a prefill/decode pair, and which.
No wire type is imported here: the router's service edge converts (services/router/convert.py).
"""

from pdmesh.routing.attempts import AttemptFailed, Attempts, Failure, Stopped
from pdmesh.routing.cache_aware import CacheAware, CacheAwareConfig
from pdmesh.routing.circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakers,
    CircuitState,
)
from pdmesh.routing.kv_cost import KvCost, KvCostConfig
from pdmesh.routing.load import LoadTracker
from pdmesh.routing.pd_pair import Pair, choose_pair, disaggregates
from pdmesh.routing.policy import RequestView, RoundRobin, RoutingPolicy, WorkerLoad
from pdmesh.routing.power_of_two import PowerOfTwo
from pdmesh.routing.radix_tree import RadixTree
from pdmesh.routing.random_policy import RandomPolicy
from pdmesh.routing.registry import POLICIES, PolicySettings, make_policy
from pdmesh.routing.request import RouteRequest
from pdmesh.routing.retry import RetryConfig, charges_breaker, is_retryable, migrates

__all__ = [
    "POLICIES",
    "AttemptFailed",
    "Attempts",
    "Failure",
    "Pair",
    "RouteRequest",
    "Stopped",
    "choose_pair",
    "disaggregates",
    "CacheAware",
    "CacheAwareConfig",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitBreakers",
    "CircuitState",
    "KvCost",
    "KvCostConfig",
    "LoadTracker",
    "PolicySettings",
    "PowerOfTwo",
    "RadixTree",
    "RandomPolicy",
    "RequestView",
    "RetryConfig",
    "RoundRobin",
    "RoutingPolicy",
    "WorkerLoad",
    "charges_breaker",
    "is_retryable",
    "make_policy",
    "migrates",
]
