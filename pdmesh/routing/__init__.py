"""How the router chooses where a request goes.

``policy``: the ``RoutingPolicy`` interface (candidates + ``RequestView`` + loads → one
candidate) and ``RoundRobin``; ``random_policy``, ``power_of_two``, ``cache_aware`` (on
``radix_tree``) and ``kv_cost``; ``registry``: policies by ``--policy`` name.
``circuit_breaker``: per-worker breakers; ``retry``: backoff, retryable and migrating status codes.
"""

from pdmesh.routing.cache_aware import CacheAware, CacheAwareConfig
from pdmesh.routing.circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitBreakers,
    CircuitState,
)
from pdmesh.routing.kv_cost import KvCost, KvCostConfig
from pdmesh.routing.load import LoadTracker
from pdmesh.routing.policy import RequestView, RoundRobin, RoutingPolicy, WorkerLoad
from pdmesh.routing.power_of_two import PowerOfTwo
from pdmesh.routing.radix_tree import RadixTree
from pdmesh.routing.random_policy import RandomPolicy
from pdmesh.routing.registry import POLICIES, PolicySettings, make_policy
from pdmesh.routing.retry import RetryConfig, charges_breaker, is_retryable, migrates

__all__ = [
    "POLICIES",
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
