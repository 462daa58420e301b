"""``LoadTracker``: the router's own count of what it has running on each worker, the live
part of the load view the policies see (workers' page-usage reports, when known, are stale)."""

from __future__ import annotations

from collections.abc import Hashable

from pdmesh.routing.policy import WorkerLoad


class LoadTracker:
    def __init__(self) -> None:
        self._in_flight: dict[Hashable, int] = {}
        self._tokens: dict[Hashable, int] = {}
        self._page_usage: dict[Hashable, float] = {}

    def start(self, worker: Hashable, tokens: int) -> None:
        self._in_flight[worker] = self._in_flight.get(worker, 0) + 1
        self._tokens[worker] = self._tokens.get(worker, 0) + tokens

    def finish(self, worker: Hashable, tokens: int) -> None:
        # never below 0: a worker removed and re-added mid-request must not go negative
        self._in_flight[worker] = max(0, self._in_flight.get(worker, 0) - 1)
        self._tokens[worker] = max(0, self._tokens.get(worker, 0) - tokens)

    def report_page_usage(self, worker: Hashable, usage: float) -> None:
        self._page_usage[worker] = usage

    def get(self, worker: Hashable) -> WorkerLoad:
        return WorkerLoad(
            self._in_flight.get(worker, 0),
            self._tokens.get(worker, 0),
            self._page_usage.get(worker),
        )

    def view(self, workers: list[str]) -> dict[str, WorkerLoad]:
        return {w: self.get(w) for w in workers}

    def remove(self, worker: Hashable) -> None:
        for table in (self._in_flight, self._tokens, self._page_usage):
            table.pop(worker, None)
