"""Prompts, the clock, and the one definition of every number the benchmark prints.

Definitions (both sides measured the same way, in the same process):

- prefill tok/s = batch x prompt_len / (time from submitting the prompts to the first token of
  every row). That is one step: the batched prompt forward plus sampling one token.
- decode ms/step = (t_last - t_first) / (N - 1), where t_first is when every row has its first
  token and t_last when every row has all N tokens: the N - 1 steps after the prefill.
- decode tok/s = batch / (ms/step / 1000) = batch x (N - 1) / (t_last - t_first).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

DEFINITIONS = (
    "prefill tok/s = batch*prompt_len / (submit -> first token of every row; one step)",
    "decode ms/step = (t_last - t_first) / (N - 1): t_first = every row has its first token, "
    "t_last = every row has N",
    "decode tok/s = batch*(N - 1) / (t_last - t_first)",
    "speedup = left column's speed over the right one's (> 1: left is faster), from the medians; "
    "best-run speedup compares each side's fastest run, which other processes on a shared "
    "machine disturb least",
)


def random_prompts(batch: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Fixed-seed random ids; ids below 16 are skipped so no prompt is full of special tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(16, vocab_size, (batch, prompt_len), generator=gen)
    return ids.tolist()


class Clock:
    """Host time that includes all queued device work: a CUDA timing syncs before reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


@dataclass
class Timing:
    """One run: batch rows of new tokens, and when the first and the last token came out."""

    batch: int
    prompt_len: int
    new_tokens: int
    first_s: float  # seconds from submission until every row has its first token
    total_s: float  # seconds from submission until every row has all its tokens
    tokens: list[list[int]] = field(default_factory=list, repr=False)

    @property
    def prefill_tok_s(self) -> float:
        return self.batch * self.prompt_len / self.first_s

    @property
    def decode_ms_step(self) -> float:
        return 1000 * (self.total_s - self.first_s) / (self.new_tokens - 1)

    @property
    def decode_tok_s(self) -> float:
        return self.batch * 1000 / self.decode_ms_step


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean share of each row's tokens before the two sides first differ (1.0 = identical)."""
    if not a or len(a) != len(b):
        return float("nan")
    shares = []
    for x, y in zip(a, b, strict=True):
        n = next(
            (i for i, (p, q) in enumerate(zip(x, y, strict=False)) if p != q), min(len(x), len(y))
        )
        shares.append(n / max(len(x), len(y), 1))
    return sum(shares) / len(shares)
