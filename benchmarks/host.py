"""Facts about the host a benchmark ran on, printed beside its figures."""

from __future__ import annotations

import os


def loadavg() -> float | None:
    """The 1-minute load average (None where the OS has none): shared machines are noisy, so
    every report says how busy this one was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None
