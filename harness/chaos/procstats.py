"""Resource use of a running process, read from Linux's ``/proc``, and whether a series of
samples stayed flat.

    s = sample(pid)                 # None once the process is gone
    s.rss_bytes, s.fds, s.threads

Flat means: the median of the last third of the samples is within a tolerance of the median
of the first third (medians, so one busy moment does not decide). Tolerances are absolute plus
relative, since a Python process's RSS wobbles by megabytes with garbage collection and
allocator caching, while a leak of one fd or thread per request grows without bound.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


TCP_CLOSE_WAIT = "08"  # the "st" column of /proc/net/tcp


@dataclass(frozen=True)
class ProcSample:
    t: float  # time.monotonic()
    rss_bytes: int
    fds: int
    threads: int
    # of ``fds``, TCP sockets the peer has closed and this process has not (yet): a peer that
    # died, and a socket nobody here will ever close if the count only grows
    close_wait: int = 0


def sample(pid: int) -> ProcSample | None:
    """RSS, open file descriptors (and how many are CLOSE_WAIT sockets) and threads of
    ``pid`` now; None if it is gone."""
    proc = Path(f"/proc/{pid}")
    try:
        # statm's second field: resident pages
        rss = int((proc / "statm").read_text().split()[1]) * PAGE_BYTES
        links = []
        for fd in os.listdir(proc / "fd"):
            with contextlib.suppress(OSError):  # closed meanwhile
                links.append(os.readlink(proc / "fd" / fd))
        threads = len(os.listdir(proc / "task"))
        closing = _close_wait_inodes(proc)
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None
    inodes = {link[len("socket:[") : -1] for link in links if link.startswith("socket:[")}
    return ProcSample(time.monotonic(), rss, len(links), threads, len(inodes & closing))


def _close_wait_inodes(proc: Path) -> set[str]:
    """Inodes of the TCP sockets in CLOSE_WAIT in ``proc``'s network namespace."""
    found: set[str] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in (proc / "net" / table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 9 and fields[3] == TCP_CLOSE_WAIT:
                    found.add(fields[9])
    return found


@dataclass(frozen=True)
class Tolerance:
    absolute: float
    relative: float = 0.0

    def allows(self, first: float, last: float) -> bool:
        return last - first <= self.absolute + self.relative * abs(first)


# what "flat" allows between the first and the last third of a run, per metric
TOLERANCES = {
    "rss MiB": Tolerance(absolute=24, relative=0.10),
    "fds": Tolerance(absolute=4),
    "close-wait": Tolerance(absolute=0),
    "threads": Tolerance(absolute=2),
    "kv held": Tolerance(absolute=0),  # KV pages, requests and rooms held while idle: none
}


@dataclass(frozen=True)
class Trend:
    first: float  # median of the first third
    last: float  # median of the last third
    flat: bool

    @property
    def growth(self) -> float:
        return self.last - self.first


def trend(values: Sequence[float], tolerance: Tolerance) -> Trend:
    """Compare the first and last thirds of ``values`` (at least 3 of them)."""
    if len(values) < 3:
        raise ValueError(f"need at least 3 samples to judge a trend, got {len(values)}")
    third = len(values) // 3
    first = statistics.median(values[:third])
    last = statistics.median(values[-third:])
    return Trend(first, last, tolerance.allows(first, last))
