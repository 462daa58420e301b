"""Small statistics shared by the router benchmarks: percentiles and medians over repeats."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation, numpy's default); nan for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float:
    """Median over repeats; nan for none."""
    return float(statistics.median(values)) if values else float("nan")


def ratio(a: float, b: float) -> float:
    """a / b; nan when b is 0 or either is nan."""
    if b == 0 or a != a or b != b:
        return float("nan")
    return a / b
