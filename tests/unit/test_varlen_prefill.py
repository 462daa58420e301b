"""``varlen_prefill``: which prefill segments share one variable-length attention call."""

from __future__ import annotations

import torch

from pdmesh.layers.attention import PrefillSegment, varlen_prefill

CPU = torch.device("cpu")
EMPTY = torch.empty(0, dtype=torch.long)


def segments(kinds: str, n: int = 4) -> list[PrefillSegment]:
    """'f': a fresh chunk (no context before it), 'c': a later chunk or a cached prefix."""
    mask = torch.ones(n, 2 * n, dtype=torch.bool)
    return [
        PrefillSegment(3 + i * n, n, n if k == "f" else 2 * n, EMPTY, None if k == "f" else mask)
        for i, k in enumerate(kinds)
    ]


def test_the_longest_run_of_fresh_segments_goes_together() -> None:
    segs = segments("ffcfff")
    segs[4].num_tokens = 9  # a longer one sets max_len; rows stay consecutive
    segs[5].start = segs[4].start + 9
    batch = varlen_prefill(segs, CPU)
    assert batch is not None
    assert batch.segments == range(3, 6)
    assert batch.rows == slice(segs[3].start, segs[5].start + 4)
    assert batch.cu_seqlens.tolist() == [0, 4, 13, 17]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.max_len == 9


def test_one_fresh_segment_or_none_keeps_the_per_segment_path() -> None:
    assert varlen_prefill(segments("f"), CPU) is None
    assert varlen_prefill(segments("cfcfc"), CPU) is None
    assert varlen_prefill([], CPU) is None
    assert varlen_prefill(segments("ff"), CPU) is not None
