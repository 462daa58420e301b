"""``StopStringMatcher``: finds stop strings in streamed text without emitting any part of one.

NOTE: text arrives in deltas, so a stop string can straddle two of them ("<|e" + "nd|>"). The
matcher therefore holds back the longest tail of the unemitted text that is a proper prefix of
some stop string, and releases it as soon as the text diverges. Because that tail is never
emitted, a match can only start inside the held-back text, so searching the unemitted text is
enough; nothing already emitted is ever taken back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pdmesh.errors import InvalidRequestError


@dataclass(frozen=True)
class StopMatch:
    """The outcome of feeding text: what may be emitted, and the stop string if one matched."""

    text: str
    stop: str | None = None


# the prefix set below grows with the square of a stop string's length: a 100k-character one
# took minutes and gigabytes on the tokenizer's event loop (found by the gRPC fuzzer)
MAX_STOP_CHARS = 1000


class StopStringMatcher:
    def __init__(self, stops: Sequence[str], field: str = "stop") -> None:
        for i, s in enumerate(stops):
            if not s:
                raise InvalidRequestError(f"{field}[{i}]", "stop strings must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise InvalidRequestError(
                    f"{field}[{i}]", f"stop strings are at most {MAX_STOP_CHARS} characters"
                )
        self._stops = tuple(dict.fromkeys(stops))  # dedupe, keep order
        # every proper prefix of every stop string: the tails worth holding back
        self._prefixes = {s[:i] for s in self._stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self._stops), default=0)
        self._pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> StopMatch:
        """Add ``text``; return the part that is safe to emit. After a match, returns nothing."""
        if self.matched is not None:
            return StopMatch("")
        if not self._stops:
            return StopMatch(text)
        self._pending += text
        hit = self._earliest_match()
        if hit is not None:
            index, stop = hit
            self.matched = stop
            emit, self._pending = self._pending[:index], ""
            return StopMatch(emit, stop)
        hold = self._held_tail_len()
        cut = len(self._pending) - hold
        emit, self._pending = self._pending[:cut], self._pending[cut:]
        return StopMatch(emit)

    def flush(self) -> str:
        """Release the held-back text: no more text will come, so it can no longer match."""
        emit, self._pending = self._pending, ""
        return emit if self.matched is None else ""

    def _earliest_match(self) -> tuple[int, str] | None:
        # Earliest start wins; at equal starts the shorter string, the one that completed first.
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            index = self._pending.find(stop)
            if index >= 0 and (best is None or (index, len(stop)) < best[:2]):
                best = (index, len(stop), stop)
        return None if best is None else (best[0], best[2])

    def _held_tail_len(self) -> int:
        for n in range(min(self._max_hold, len(self._pending)), 0, -1):
            if self._pending[-n:] in self._prefixes:
                return n
        return 0
