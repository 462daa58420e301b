"""Routing policies: given the workers a request may go to, pick one.

A policy sees only the candidates (already filtered for health and open circuits by the
caller), a view of the request (its token ids and id) and a view of the workers' load, plus
whatever it keeps itself (a cursor, a radix tree). It never talks to the network, so it is
cheap to call per request and easy to test without services.

Candidates are any hashable worker keys (the router passes worker ids, tests pass strings):
stateful policies key their state (e.g. a worker's radix-tree tenant) by them.
"""

from __future__ import annotations

import abc
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class RequestView:
    """What a policy may know about a request: its prompt's token ids and its id."""

    token_ids: Sequence[int] = ()
    request_id: str = ""


@dataclass(frozen=True)
class WorkerLoad:
    """One worker's load as the router sees it.

    ``in_flight``: requests the router has on it now (live, exact for this router).
    ``active_tokens``: prompt tokens of those requests (what ``kv_cost`` counts as decode
    blocks). ``page_usage``: fraction of its KV pages in use as the worker last reported, or None
    when unknown (reports are periodic, hence stale: they only break ties, see ``load_key``).
    """

    in_flight: int = 0
    active_tokens: int = 0
    page_usage: float | None = None


NO_LOAD = WorkerLoad()
NO_REQUEST = RequestView()


def load_of(loads: Mapping[K, WorkerLoad] | None, worker: K) -> WorkerLoad:
    return NO_LOAD if loads is None else loads.get(worker, NO_LOAD)


def load_key(loads: Mapping[K, WorkerLoad] | None, worker: K) -> tuple[int, float]:
    """Sort key, lower = less loaded. In-flight count first: it is exact and changes with every
    routing decision, whereas a page-usage report is seconds old, and ranking by it first would
    send every request to the same worker until its next report (herding)."""
    load = load_of(loads, worker)
    return (load.in_flight, load.page_usage if load.page_usage is not None else 0.0)


class RoutingPolicy(abc.ABC):
    name: str = ""

    @abc.abstractmethod
    def select(
        self,
        candidates: Sequence[K],
        request: RequestView = NO_REQUEST,
        loads: Mapping[K, WorkerLoad] | None = None,
    ) -> K:
        """One of ``candidates`` (never empty) for the request. May update the policy's own
        state (a cursor, a tree); never mutates ``candidates``."""

    def remove_worker(self, worker: Hashable) -> None:  # noqa: B027 (optional hook)
        """Forget whatever is kept about ``worker`` (it left the set). Stateless: nothing."""


def check_candidates(candidates: Sequence[object]) -> None:
    if not candidates:
        raise ValueError("no candidates to select from")


@dataclass
class RoundRobin(RoutingPolicy):
    """Each request goes to the next candidate in turn.

    The cursor counts requests, not positions in one fixed list, so when the candidate list
    grows or shrinks the rotation simply continues over the new list.
    """

    name = "round_robin"
    _next: int = field(default=0, init=False)

    def select(
        self,
        candidates: Sequence[K],
        request: RequestView = NO_REQUEST,
        loads: Mapping[K, WorkerLoad] | None = None,
    ) -> K:
        check_candidates(candidates)
        choice = candidates[self._next % len(candidates)]
        self._next += 1
        return choice
