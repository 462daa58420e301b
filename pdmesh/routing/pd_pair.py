"""The prefill/decode pair choice: whether a request runs disaggregated at all, and on which
prefill and decode worker.

Disaggregated only when the router knows decode workers, a prefill is available, the prompt
has at least ``min_prompt_tokens`` tokens and at least one token is wanted (conditional
disaggregation: otherwise the request runs whole on one worker, which prefills it itself; no
prefill is no failure, decode-only beats failing).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, NamedTuple, TypeVar

from pdmesh.routing.request import RouteRequest

W = TypeVar("W")


class Pair(NamedTuple, Generic[W]):
    prefill: W
    decode: W


def disaggregates(request: RouteRequest, min_prompt_tokens: int, has_decodes: bool) -> bool:
    """Whether ``request`` should be split over a pair (given one is available)."""
    if not request.wants_tokens:
        return False  # nothing to decode
    if len(request.prompt) < min_prompt_tokens:
        return False
    return has_decodes


def choose_pair(
    prefills: Sequence[W],
    decodes: Callable[[], Sequence[W]],
    pick_prefill: Callable[[Sequence[W]], W],
    pick_decode: Callable[[Sequence[W]], W],
) -> Pair[W] | None:
    """The pair, or None when either side has no candidate. ``prefills``: those known to
    work (healthy, circuit closed); the prefill is picked first (its policy learns of it
    either way), then the decode among ``decodes()``."""
    if not prefills:
        return None
    prefill = pick_prefill(prefills)
    candidates = decodes()
    if not candidates:
        return None
    return Pair(prefill, pick_decode(candidates))
