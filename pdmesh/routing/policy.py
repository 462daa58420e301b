"""Routing policies: given the workers a request may go to, pick one.

A policy sees only the candidates (already filtered for health by the caller) and whatever it
keeps itself; it never talks to the network, so it is cheap to call per request and easy to
test without services. Later policies (least-load, prefix-cache-aware, PD pairing) implement
the same interface.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class RoutingPolicy(abc.ABC):
    @abc.abstractmethod
    def select(self, candidates: Sequence[T]) -> T:
        """One of ``candidates`` (never empty) for the next request. May update the policy's
        own state (e.g. a cursor); never mutates ``candidates``."""


class RoundRobin(RoutingPolicy):
    """Each request goes to the next candidate in turn.

    The cursor counts requests, not positions in one fixed list, so when the candidate list
    grows or shrinks the rotation simply continues over the new list.
    """

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[T]) -> T:
        if not candidates:
            raise ValueError("no candidates to select from")
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice


POLICIES: dict[str, Callable[[], RoutingPolicy]] = {"round_robin": RoundRobin}


def make_policy(name: str) -> RoutingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose {', '.join(POLICIES)}") from None
