"""The KV transfers of a 1p1d run, read from the prefill worker's log.

The prefill logs one debug line per room it wrote (``pdmesh.pd.prefill``):
``room R: N pages (B bytes) to D in T ms (BACKEND, K runs of pages)`` — the bytes and the time
of the write alone (from its first copy to the last one done), the same figures its
``kv_transfer`` span carries, and the backend the pair negotiated (``auto``). The
benchmark starts the prefill with ``--log-level debug`` and reads the lines a timed run added.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOM_LINE = re.compile(
    r"room (\d+): (\d+) pages \((\d+) bytes\) to (\S+) in ([0-9.]+) ms(?: \((\w+), \d+ runs)?"
)


@dataclass(frozen=True)
class Write:
    room: int
    pages: int
    bytes: int
    ms: float
    backend: str = ""

    @property
    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e6) if self.ms > 0 else float("nan")


def log_offset(path: Path) -> int:
    """Where the log ends now: ``writes`` after this offset are a later run's."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def writes(path: Path, offset: int = 0) -> list[Write]:
    with path.open("rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    return [
        Write(int(m[1]), int(m[2]), int(m[3]), float(m[5]), m[6] or "")
        for m in ROOM_LINE.finditer(text)
    ]


def summarize(ws: list[Write], long_min_pages: int) -> dict[str, Any]:
    """Totals over every room, and medians over the long prompts' rooms (at least
    ``long_min_pages`` pages) — the ones whose transfer weighs on TTFT."""
    total_bytes = sum(w.bytes for w in ws)
    total_ms = sum(w.ms for w in ws)
    longs = [w for w in ws if w.pages >= long_min_pages]

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    return {
        "rooms": len(ws),
        "bytes": total_bytes,
        "seconds": total_ms / 1e3,
        # bytes over the summed write times: what the link moved while it was moving
        "gbps": total_bytes / (total_ms * 1e6) if total_ms > 0 else float("nan"),
        "long_rooms": len(longs),
        "long_mb_p50": median([w.bytes / 1e6 for w in longs]),
        "long_ms_p50": median([w.ms for w in longs]),
        "long_gbps_p50": median([w.gbps for w in longs]),
        "backends": ",".join(sorted({w.backend for w in ws if w.backend})),
    }
