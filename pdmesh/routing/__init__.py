"""How the router chooses where a request goes: ``policy`` (a ``RoutingPolicy`` picks one of
the candidate workers; ``RoundRobin`` for now, load- and cache-aware policies later)."""

from pdmesh.routing.policy import POLICIES, RoundRobin, RoutingPolicy, make_policy

__all__ = ["POLICIES", "RoundRobin", "RoutingPolicy", "make_policy"]
