"""What happened to a set of requests: how many completed, failed (and why), were cancelled by
their client, or ended past their deadline.

    hit = [o for o in outcomes if o.in_flight_at(t_fault)]
    t = tally(hit, deadline_s=30)
    assert t.past_deadline == 0 and t.completion_rate >= 0.99

Failure messages are folded into short reasons: numbers (ports, ids, counts, seconds) become
``#`` so the same failure on two requests reads the same.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from harness.chaos.load import CANCELLED, FAILED, OK, Outcome

REASON_CHARS = 110
_NUMBERS = re.compile(r"\d+(\.\d+)?")
_IDS = re.compile(r"\b[0-9a-f]{16,}\b")


@dataclass(frozen=True)
class Tally:
    total: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    unfinished: int = 0  # not ended yet (a hang, while the run still waits)
    past_deadline: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # failure reason -> count

    @property
    def completion_rate(self) -> float:
        """Completed among those the client did not cancel itself (1.0 when there are none)."""
        judged = self.total - self.cancelled
        return self.completed / judged if judged else 1.0

    @property
    def unclear(self) -> int:
        """Failures that came without a message: never acceptable."""
        return self.reasons.get("", 0)

    def describe_reasons(self, limit: int = 3) -> str:
        """The most common reasons, "2x HTTP 503: ...; 1x ..."; "" when none failed."""
        return "; ".join(f"{n}x {r or '(no message)'}" for r, n in self.reasons.most_common(limit))


def tally(outcomes: Iterable[Outcome], deadline_s: float) -> Tally:
    total = completed = failed = cancelled = unfinished = late = 0
    reasons: Counter[str] = Counter()
    for o in outcomes:
        total += 1
        if o.past_deadline(deadline_s):
            late += 1
        if o.status == OK:
            completed += 1
        elif o.status == CANCELLED:
            cancelled += 1
        elif o.status == FAILED:
            failed += 1
            reasons[reason(o.error)] += 1
        else:
            unfinished += 1
    return Tally(total, completed, failed, cancelled, unfinished, late, reasons)


def reason(error: str) -> str:
    """``error`` with numbers and hex ids folded, cut to a table cell's length."""
    folded = _NUMBERS.sub("#", _IDS.sub("<id>", error.strip()))
    folded = " ".join(folded.split())
    return folded if len(folded) <= REASON_CHARS else folded[: REASON_CHARS - 1] + "…"


def in_flight_at(outcomes: Iterable[Outcome], t: float) -> list[Outcome]:
    return [o for o in outcomes if o.in_flight_at(t)]


def started_between(outcomes: Iterable[Outcome], t0: float, t1: float) -> list[Outcome]:
    return [o for o in outcomes if t0 < o.start <= t1]
