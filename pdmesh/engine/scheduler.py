"""Continuous batching with chunked prefill under a per-step token budget.

NOTE: there are no prefill and decode phases, only each running sequence's
``num_computed_tokens`` catching up with its ``num_tokens``. A step gives every decoding
sequence one token, then spends what is left of ``max_num_batched_tokens`` on prefill chunks:
first for sequences already mid-prefill, then for newly admitted ones. Admission is FIFO and
stops at the first request that does not fit (pages or ``max_running_requests``): it waits,
never crashes. When a decoding sequence needs a page and none is free, the youngest running
sequence is preempted — its pages are freed and it is recomputed later from its tokens so far.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """What one step computes: ``num_new_tokens[i]`` tokens of ``seqs[i]``, decodes first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def samples(self, i: int) -> bool:
        """Whether ``seqs[i]`` reaches its last token this step and so samples the next one."""
        seq = self.seqs[i]
        return seq.num_computed_tokens + self.num_new_tokens[i] == seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_running_requests: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.blocks = block_manager
        self.max_running_requests = max_running_requests
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._order = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival_order = next(self._order)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Start a sequence whose pages are already allocated and filled (PD decode side)."""
        seq.arrival_order = next(self._order)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        for seq in list(self.running):  # a copy: _make_room may preempt later entries
            if (
                seq.status is SequenceStatus.RUNNING  # not preempted earlier in this loop
                and not seq.is_prefilling
                and budget > 0
                and self._make_room(seq, batch)
            ):
                batch.add(seq, 1)
                budget -= 1
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.num_uncomputed_tokens, budget)
                batch.add(seq, n)
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
            seq = self.waiting[0]
            if not self.blocks.can_allocate(seq):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.add(seq, n)
            budget -= n
        return batch

    def finish(self, seq: Sequence, reason: FinishReason, error: str | None = None) -> None:
        """End ``seq`` wherever it is and free its pages."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error

    def _make_room(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Ensure ``seq`` has a page for its next token, preempting the youngest if needed.

        Sequences already in ``batch`` are never victims. Returns False when ``seq`` itself
        was preempted.
        """
        while not self.blocks.can_grow(seq, seq.num_tokens):
            victim = max(
                (s for s in self.running if s is seq or s not in batch.seqs),
                key=lambda s: s.arrival_order,
            )
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.grow(seq, seq.num_tokens)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
