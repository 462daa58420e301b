"""Steady output rate: tokens that arrived while every client was busy, over that window.

A closed-loop arm ramps up (all clients send at once, and the first tokens wait for a burst of
prompts) and drains (once the clients stop sending, fewer requests are in flight). The whole
arm's tok/s depends on how long those last next to the arm; the steady window leaves both out:
it opens when every one of the first ``concurrency`` requests has its first token and closes at
the last send (until then every client was either streaming or sending its next request).
Arrival times are rebuilt from each request's TTFT and inter-token gaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.serve.timing import RequestResult


def arrivals(r: RequestResult) -> list[float]:
    """When ``r``'s streamed messages arrived (seconds from the run's start): the first at its
    TTFT, the rest after its gaps (a message of n tokens contributed n gaps of gap/n, so this
    gives n times, the last of them the message's own)."""
    t = r.start_s + r.ttft_s
    out = [t]
    for gap in r.itl_s:
        t += gap
        out.append(t)
    return out


@dataclass(frozen=True)
class Steady:
    tok_s: float  # nan without a window
    window_s: float  # its length: a short one (a slow first wave) gives a rough figure


NONE = Steady(math.nan, 0.0)


def steady_rate(results: Sequence[RequestResult], concurrency: int) -> Steady:
    """Output tokens per second inside the steady window; ``NONE`` when there is no window
    (every request was sent in the first wave, or nothing completed)."""
    done = [r for r in results if r.success and r.output_tokens > 0]
    if len(done) <= concurrency:
        return NONE
    first_wave = sorted(done, key=lambda r: r.start_s)[:concurrency]
    opens = max(r.start_s + r.ttft_s for r in first_wave)
    closes = max(r.start_s for r in done)
    if closes <= opens:
        return NONE
    tokens = 0.0
    for r in done:
        times = arrivals(r)
        # the server's count wins (SSE chunks may carry several tokens each): spread it evenly
        weight = r.output_tokens / len(times)
        tokens += weight * sum(opens <= t < closes for t in times)
    return Steady(tokens / (closes - opens), closes - opens)
