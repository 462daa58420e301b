"""CPU per streamed token: each process's utime + stime (``/proc/<pid>/stat``, all its threads)
over an arm, divided by the tokens the arm delivered.

CPU time is the figure other load on a shared machine moves least (latencies and tok/s swing
with it); per token, it says which hop the path's cost lives in and whether it grows with the
batch. ``cores`` (CPU seconds over wall seconds) says when a process was saturated: a
single-threaded Python hop near 1.0 is the bottleneck of its arm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from benchmarks.routers.fleet import process_cpu_seconds

# the name the load generator's own CPU goes under
LOADGEN = "loadgen"


def sample(pids: Mapping[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each named process (nan for one that is gone)."""
    return {name: process_cpu_seconds(pid) for name, pid in pids.items()}


@dataclass(frozen=True)
class CpuUsage:
    """CPU seconds each process spent during one arm, with the arm's wall time and tokens."""

    seconds: dict[str, float]
    wall_s: float
    tokens: int

    @classmethod
    def between(
        cls, before: Mapping[str, float], after: Mapping[str, float], wall_s: float, tokens: int
    ) -> CpuUsage:
        """The usage of every process sampled both times (``after - before``)."""
        return cls({n: after[n] - before[n] for n in before if n in after}, wall_s, tokens)

    def with_process(self, name: str, seconds: float) -> CpuUsage:
        """This usage plus one more process measured elsewhere (the load generator's own)."""
        return CpuUsage({**self.seconds, name: seconds}, self.wall_s, self.tokens)

    def us_per_token(self, name: str) -> float:
        """µs of ``name``'s CPU per delivered token; nan when not measured or nothing came."""
        value = self.seconds.get(name, math.nan)
        return value * 1e6 / self.tokens if self.tokens > 0 else math.nan

    def cores(self, name: str) -> float:
        """``name``'s CPU seconds per wall second (1.0: one core busy all the arm long)."""
        value = self.seconds.get(name, math.nan)
        return value / self.wall_s if self.wall_s > 0 else math.nan

    def total_us_per_token(self, names: list[str]) -> float:
        """µs per token of ``names`` together (the processes measured among them)."""
        known = [n for n in names if n in self.seconds]
        if not known or self.tokens <= 0:
            return math.nan
        return sum(self.seconds[n] for n in known) * 1e6 / self.tokens
