"""What the fuzz tests share: how many inputs to send, the tally of outcomes, and the loop that
draws inputs with hypothesis and sends each one.

The default suite sends a few hundred inputs per API (``PDMESH_FUZZ_EXAMPLES``, default 200);
``make fuzz`` sends 10,000. A server error does not stop the run: every input is sent and
tallied, and the test fails at the end listing the first offenders, so one run reports how many
server errors there were among how many inputs (the line ``fuzz <api>: N inputs, K server
errors`` is printed either way). ``PDMESH_FUZZ_SEED`` replays a run: the seed is printed.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

T = TypeVar("T")

EXAMPLES = int(os.environ.get("PDMESH_FUZZ_EXAMPLES", "200"))
SEED = int(os.environ.get("PDMESH_FUZZ_SEED") or random.randrange(2**32))
CHECK_EVERY = 250  # inputs between checks that every service still answers
SHOWN_FAILURES = 5
SHOWN_INPUT_CHARS = 300
SHOWN_SLOWEST = 3  # the summary names the slowest inputs: where a run's time went


@dataclass(frozen=True)
class Outcome:
    """What one input got back: ``label`` for the tally (an HTTP status, a gRPC code), and
    ``server_error``, set when it was a server fault (with what to show for it)."""

    label: str
    server_error: str | None = None


@dataclass
class Tally:
    api: str
    inputs: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    slowest: list[tuple[float, str]] = field(default_factory=list)  # (seconds, what), top few

    @property
    def server_errors(self) -> int:
        return len(self.failures)

    def record(self, example: object, outcome: Outcome, seconds: float = 0.0) -> None:
        self.inputs += 1
        self.labels[outcome.label] += 1
        if outcome.server_error is not None:
            self.failures.append(
                f"{outcome.label}: {outcome.server_error}\n    input: {_shown(example)}"
            )
        if len(self.slowest) < SHOWN_SLOWEST or seconds > self.slowest[-1][0]:
            self.slowest.append((seconds, f"{outcome.label}: {_shown(example, 160)}"))
            self.slowest = sorted(self.slowest, reverse=True)[:SHOWN_SLOWEST]

    def summary(self) -> str:
        labels = ", ".join(f"{k} x{v}" for k, v in self.labels.most_common())
        slow = "".join(f"\n    slowest: {t:.1f}s {what}" for t, what in self.slowest)
        return (
            f"fuzz {self.api}: {self.inputs} inputs, {self.server_errors} server errors "
            f"in {self.seconds:.0f}s (seed {SEED}; {labels}){slow}"
        )

    def check(self, minimum: int) -> None:
        """Fail unless there was no server error and at least ``minimum`` inputs went out."""
        assert not self.failures, f"{self.summary()}\nfirst server errors:\n" + "\n".join(
            self.failures[:SHOWN_FAILURES]
        )
        assert self.inputs >= minimum, self.summary()


def fuzz(
    api: str,
    inputs: st.SearchStrategy[T],
    send: Callable[[T], Outcome],
    alive: Callable[[], None],
    examples: int = EXAMPLES,
) -> Tally:
    """Draw ``examples`` inputs, ``send`` each and tally the outcomes; call ``alive`` (which
    raises if a service went down) every ``CHECK_EVERY`` inputs and at the end. Prints the
    summary line and returns the tally (``Tally.check`` asserts on it)."""
    tally = Tally(api)
    start = time.monotonic()

    # generate only: no shrinking (nothing raises inside), no example database
    @seed(SEED)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def one(example: Any) -> None:
        sent = time.monotonic()
        outcome = send(example)
        tally.record(example, outcome, time.monotonic() - sent)
        if tally.inputs % CHECK_EVERY == 0:
            alive()

    one()
    alive()
    tally.seconds = time.monotonic() - start
    print(tally.summary())
    return tally


def _shown(example: object, limit: int = SHOWN_INPUT_CHARS) -> str:
    shown = repr(example)
    return shown if len(shown) <= limit else shown[:limit] + f"... ({len(shown)} chars)"
