from __future__ import annotations

from pdmesh.engine.block_manager import BlockManager
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.scheduler import ScheduledBatch, Scheduler
from pdmesh.engine.sequence import FinishReason, Sequence, SequenceStatus


def make_scheduler(
    num_pages: int = 16, page_size: int = 4, max_running: int = 8, budget: int = 64
) -> Scheduler:
    return Scheduler(BlockManager(num_pages, page_size), max_running, budget)


def make_requests(n: int, prompt_len: int) -> list[Sequence]:
    return [
        Sequence(f"r{i}", [i * 1000 + t for t in range(prompt_len)], SamplingParams())
        for i in range(n)
    ]


def complete_step(batch: ScheduledBatch, token: int = 7) -> None:
    """What the engine does after the model ran: advance, and append sampled tokens."""
    for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
        sampled = batch.samples(i)
        seq.num_computed_tokens += n
        if sampled:
            seq.token_ids.append(token)


def test_chunked_prefill_respects_token_budget() -> None:
    s = make_scheduler(budget=8)
    (a,) = make_requests(1, 20)
    s.add(a)
    chunks = []
    for _ in range(3):
        b = s.schedule()
        chunks.append(b.num_new_tokens[0])
        assert b.num_tokens <= 8
        complete_step(b)
    assert chunks == [8, 8, 4]
    assert a.num_completion_tokens == 1  # sampled only at the end of the prompt


def test_decodes_come_first_and_prefill_fills_the_budget() -> None:
    s = make_scheduler(budget=10)
    a, b = make_requests(2, 6)
    s.add(a)
    complete_step(s.schedule())  # a prefilled, has 1 token
    s.add(b)
    batch = s.schedule()
    assert batch.seqs == [a, b] and batch.num_new_tokens == [1, 6]


def test_admission_queues_when_pages_run_out() -> None:
    s = make_scheduler(num_pages=4, page_size=4)
    a, b = make_requests(2, 12)  # 3 pages each
    s.add(a)
    s.add(b)
    batch = s.schedule()
    assert batch.seqs == [a] and list(s.waiting) == [b]
    s.finish(a, FinishReason.STOP)
    batch = s.schedule()
    assert batch.seqs == [b]


def test_max_running_requests() -> None:
    s = make_scheduler(max_running=2)
    for r in make_requests(3, 2):
        s.add(r)
    batch = s.schedule()
    assert len(batch.seqs) == 2 and len(s.waiting) == 1


def test_preempts_youngest_when_decode_needs_a_page() -> None:
    s = make_scheduler(num_pages=2, page_size=2, budget=64)
    a, b = make_requests(2, 2)
    s.add(a)
    s.add(b)
    complete_step(s.schedule())  # both prefilled: 1 page each, 3 tokens each
    batch = s.schedule()  # a needs a 2nd page: b (youngest) is preempted
    assert batch.seqs == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == []
    assert b.num_computed_tokens == 0 and b.num_preemptions == 1
    assert s.num_preemptions == 1 and s.waiting[0] is b


def test_finish_frees_pages_from_any_state() -> None:
    s = make_scheduler(num_pages=4, page_size=4, budget=4)
    a, b = make_requests(2, 8)
    s.add(a)
    s.add(b)
    s.schedule()  # a mid-prefill (4 of 8), b waiting
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    assert s.blocks.num_free_pages == 4 and not s.has_work
    assert a.finish_reason is FinishReason.ABORT and a.is_finished
