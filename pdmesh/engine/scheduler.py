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
    # the first num_decode rows are decodes: one token each, and each samples
    num_decode: int = 0

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
        budget, prefilling = self._schedule_decodes(batch)
        batch.num_decode = len(batch.seqs)
        if budget > 0 and prefilling:
            for seq in self.running:
                if seq.is_prefilling:
                    n = min(seq.num_uncomputed_tokens, budget)
                    batch.add(seq, n)
                    budget -= n
                    if budget <= 0:
                        break
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

    def _schedule_decodes(self, batch: ScheduledBatch) -> tuple[int, bool]:
        """One token for every decoding sequence; returns the budget left and whether a
        running sequence is prefilling (else the prefill pass over them is skipped).

        The loop runs over every running sequence each step, so it reads the fields directly
        (no properties) and asks the block manager only when the last page is full.
        """
        budget = self.max_num_batched_tokens
        page_size = self.blocks.page_size
        seqs, counts = batch.seqs, batch.num_new_tokens
        running = SequenceStatus.RUNNING
        prefilling = False
        for seq in list(self.running):  # a copy: _make_room may preempt later entries
            if budget <= 0:
                return budget, True  # the rest not looked at: no budget left for them anyway
            n = len(seq.token_ids)
            if seq.status is not running:
                continue  # preempted earlier in this loop
            if n - seq.num_computed_tokens > 1:
                prefilling = True
                continue
            if len(seq.block_table) * page_size < n and not self._make_room(seq, batch):
                continue
            seqs.append(seq)
            counts.append(1)
            budget -= 1
        return budget, prefilling

    def retire(self, seqs: list[Sequence]) -> None:
        """Take sequences whose last token the step just launched samples out of the schedule;
        they keep their pages (and status) until ``finish`` (overlap schedule: the engine learns
        the token one step later, but knows now that nothing follows it)."""
        for seq in seqs:
            seq.final_pending = True
        self.running = [s for s in self.running if not s.final_pending]

    def finish(
        self,
        seq: Sequence,
        reason: FinishReason,
        error: str | None = None,
        free_pages: bool = True,
    ) -> None:
        """End ``seq`` wherever it is and free its pages (unless the caller frees them later)."""
        # the status says which queue may hold it, so a batch that ends at once costs no
        # scan of the running list each (a retired sequence is in neither; a new one that
        # ends before it is queued, max_new_tokens=0, has status WAITING but no queue)
        if seq.status is SequenceStatus.RUNNING and not seq.final_pending:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        if free_pages:
            self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error

    def _make_room(self, seq: Sequence, batch: ScheduledBatch) -> bool:
        """Ensure ``seq`` has a page for its next token, preempting the youngest if needed.

        Sequences already in ``batch`` are never victims. Returns False when ``seq`` itself
        was preempted.
        """
        scheduled: set[int] | None = None
        while not self.blocks.can_grow(seq, seq.num_tokens):
            if scheduled is None:  # built only when someone has to go: a set, not a list scan
                scheduled = {id(s) for s in batch.seqs}
            victim = max(
                (s for s in self.running if s is seq or id(s) not in scheduled),
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
