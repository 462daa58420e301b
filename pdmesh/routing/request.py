"""``RouteRequest``: what the router decides on for one request, free of any wire type.

The router's service edge (``services/router/convert.py``) makes one from the client's message
and turns it (plus the sampling parameters it passes through untouched) into each worker's
request. Everything the routing core looks at is here: the prompt's token ids (the policies'
``RequestView``), the token budgets (whether there is anything to decode, and what is left of
them after a migration), the deadline, and how many prompt tokens are earlier output.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pdmesh.routing.policy import RequestView


@dataclass(frozen=True)
class RouteRequest:
    request_id: str
    prompt: Sequence[int]  # what the worker prefills: the client's prompt, plus resumed output
    max_new_tokens: int | None = None  # None: unset, the worker's default budget applies
    min_new_tokens: int | None = None
    deadline: float = float("inf")  # event-loop time by which the whole generation must end
    # prompt tokens at the end of ``prompt`` that are output already streamed (a migration):
    # the worker counts them against its default budget and replays them through a grammar
    resumed_output_tokens: int = 0

    @property
    def view(self) -> RequestView:
        """What a routing policy may see of it."""
        return RequestView(self.prompt, self.request_id)

    @property
    def wants_tokens(self) -> bool:
        """False when the client asked for no new token at all (nothing to decode)."""
        return self.max_new_tokens != 0

    def attempt_id(self) -> str:
        """The id a worker knows one attempt at the request by: the client's id, made unique per
        attempt. Workers key their engine state by id, and a worker still unwinding an attempt
        that failed (a lost prefill, a dead router whose request the gateway sent on to
        another) aborts it by id: under the same id a retry would be stopped by that abort.
        Clients' own ids need not be unique either."""
        return f"{self.request_id}.{uuid.uuid4().hex[:8]}"

    def resumed(self, sent: Sequence[int]) -> RouteRequest:
        """The request continued elsewhere after ``sent`` completion tokens were streamed: the
        prompt grows by them and the budgets shrink by as many. An unset ``max_new_tokens``
        stays unset (the new worker's default counts ``resumed_output_tokens``); a minimum
        never exceeds the maximum left."""
        max_new = self.max_new_tokens
        if max_new is not None:
            max_new = max(max_new - len(sent), 0)
        min_new = self.min_new_tokens
        if min_new is not None:
            left = max(min_new - len(sent), 0)
            min_new = min(left, max_new) if max_new is not None else left
        return replace(
            self,
            prompt=[*self.prompt, *sent],
            max_new_tokens=max_new,
            min_new_tokens=min_new,
            resumed_output_tokens=self.resumed_output_tokens + len(sent),
        )
