"""``TransferWaiter``'s bookkeeping, driven by a scripted ``transfer_check_status``: Mooncake's
rare answers (its own timeout, a check that raises) cannot be provoked on demand with a real
engine. tests/integration/test_kv_transfer.py runs the waiter behind real Mooncake writes."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from pdmesh.kv_transfer.mooncake_waiter import TIMED_OUT, TransferWaiter

RUNNING, DONE, FAILED, MC_TIMEOUT = 0, 1, -1, -2


class Script:
    """``check(batch_id)`` answers each batch's statuses in turn, repeating the last; it
    records every call. A batch listed in ``raises`` makes the check raise."""

    def __init__(
        self, statuses: dict[int, list[int]], raises: frozenset[int] = frozenset()
    ) -> None:
        self.statuses = {b: list(s) for b, s in statuses.items()}
        self.raises = raises
        self.calls: list[int] = []
        self.lock = threading.Lock()

    def check(self, batch_id: int) -> int:
        with self.lock:
            self.calls.append(batch_id)
            if batch_id in self.raises:
                raise RuntimeError(f"batch {batch_id} is corrupt")
            queue = self.statuses[batch_id]
            return queue.pop(0) if len(queue) > 1 else queue[0]

    def release(self, batch_id: int, status: int = DONE) -> None:
        with self.lock:
            self.statuses[batch_id] = [status]


def wait(waiter: TransferWaiter, batch_ids: list[int], rc: int = 0, timeout: float = 5.0) -> int:
    async def run() -> int:
        loop = asyncio.get_running_loop()
        return await waiter.add(loop, batch_ids, rc, time.monotonic() + timeout)

    return asyncio.run(run())


def test_a_write_ends_once_every_batch_has_and_no_sooner() -> None:
    script = Script({1: [RUNNING, RUNNING, DONE], 2: [RUNNING, DONE]})
    waiter = TransferWaiter(script.check)
    assert wait(waiter, [1, 2]) == 0
    waiter.stop()
    # each batch was looked at until it said done, and never after (done frees it in Mooncake)
    assert script.calls.count(1) == 3
    assert script.calls[-1] == 2
    assert waiter.abandoned == []


def test_the_first_failure_wins_and_the_other_batches_are_still_waited_for() -> None:
    script = Script({1: [FAILED], 2: [RUNNING, RUNNING, FAILED], 3: [RUNNING, DONE]})
    waiter = TransferWaiter(script.check)
    assert wait(waiter, [1, 2, 3]) == FAILED
    waiter.stop()
    assert script.calls[-1] == 3  # batch 3 still reads our memory: waited for to its end


def test_a_failed_submit_reports_its_code_after_the_submitted_batches_end() -> None:
    script = Script({7: [RUNNING, DONE]})
    waiter = TransferWaiter(script.check)
    assert wait(waiter, [7], rc=-1) == -1
    assert wait(waiter, [], rc=-1) == -1  # nothing was submitted at all
    waiter.stop()
    assert script.calls == [7, 7]


def test_the_deadline_gives_up_and_keeps_the_running_batches_for_close() -> None:
    script = Script({1: [DONE], 2: [RUNNING], 3: [RUNNING]})
    waiter = TransferWaiter(script.check)
    assert wait(waiter, [1, 2, 3], timeout=0.05) == TIMED_OUT
    waiter.stop()
    assert waiter.abandoned == [2, 3]


def test_mooncakes_own_timeout_is_reported_and_its_batch_kept() -> None:
    # -2 does not free the batch in Mooncake: close() must drain it like an abandoned one
    script = Script({4: [MC_TIMEOUT], 5: [DONE]})
    waiter = TransferWaiter(script.check)
    assert wait(waiter, [4, 5]) == MC_TIMEOUT
    waiter.stop()
    assert waiter.abandoned == [4]


def test_a_check_that_raises_fails_its_write_and_the_waiter_serves_the_rest() -> None:
    script = Script({1: [RUNNING], 2: [RUNNING, DONE]}, raises=frozenset({9}))
    waiter = TransferWaiter(script.check)

    async def run() -> list[int]:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 5
        slow = waiter.add(loop, [1], 0, deadline)
        broken = waiter.add(loop, [9], 0, deadline)
        quick = waiter.add(loop, [2], 0, deadline)
        results = [await broken, await quick]
        script.release(1)
        return results + [await slow]

    assert asyncio.run(run()) == [FAILED, 0, 0]
    waiter.stop()


def test_a_cancelled_write_is_still_waited_for_and_stop_waits_for_it() -> None:
    script = Script({1: [RUNNING]})
    waiter = TransferWaiter(script.check)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        write = waiter.add(loop, [1], 0, time.monotonic() + 30)
        write.cancel()  # the room was cancelled: nobody listens any more
        await asyncio.sleep(0.01)

    asyncio.run(run())
    stopper = threading.Thread(target=waiter.stop)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # Mooncake still reads our memory for batch 1
    calls = len(script.calls)
    script.release(1)
    stopper.join(5)
    assert not stopper.is_alive()
    assert len(script.calls) > calls
    assert waiter.abandoned == []


def test_a_stopped_waiter_refuses_writes() -> None:
    waiter = TransferWaiter(Script({}).check)
    waiter.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        wait(waiter, [1])
