"""Holding back text that may be the start of a marker (``<think>``, ``<tool_call>``...).

A streamed delta can end in the middle of a marker (``"... <tool_"``); emitting that prefix
would leak markup into the other channel, so parsers keep the longest suffix of their buffer
that is a proper prefix of a marker until the next delta (or ``finish()``) decides.
"""

from __future__ import annotations

from collections.abc import Sequence


def partial_suffix_len(text: str, markers: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``markers``.

    Costs O(sum of marker lengths^2) at most, independent of ``len(text)``.
    """
    best = 0
    for marker in markers:
        for k in range(min(len(marker) - 1, len(text)), best, -1):
            if text.endswith(marker[:k]):
                best = k
                break
    return best
