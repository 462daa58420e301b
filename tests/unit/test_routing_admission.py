"""The router's admission control (pdmesh/routing/admission.py): the concurrency limit, the
queue (full → QueueFullError, too long → QueueTimeoutError), FIFO hand-over, and no slot leaked
or given back twice however a request ends (done, failed, cancelled in the queue, released from
a done-callback, cancelled just as its slot arrived)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import pytest

from pdmesh.routing.admission import (
    Admission,
    AdmissionConfig,
    QueueFullError,
    QueueTimeoutError,
    Ticket,
)
from pdmesh.rpc.errors import status_for


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


async def settle() -> None:
    """Let every ready callback and task step run."""
    for _ in range(5):
        await asyncio.sleep(0)


def admission(limit: int = 1, queue: int = 10, timeout: float = 30.0) -> Admission:
    return Admission(AdmissionConfig(limit, queue, timeout))


async def held(adm: Admission) -> Ticket:
    ticket = adm.ticket()
    await ticket.acquire()
    assert ticket.holding
    return ticket


def test_limit_queues_the_rest_and_a_release_hands_over() -> None:
    async def scenario() -> None:
        adm = admission(limit=2)
        first, second = await held(adm), await held(adm)
        third = adm.ticket()
        waiting = asyncio.create_task(third.acquire())
        await settle()
        assert (adm.active, adm.queued, waiting.done()) == (2, 1, False)
        first.release()
        await waiting
        assert third.holding and (adm.active, adm.queued) == (2, 0)
        second.release()
        third.release()
        assert adm.active == 0

    run(scenario)


def test_waiters_get_slots_in_arrival_order() -> None:
    async def scenario() -> None:
        adm = admission(limit=1)
        holder = await held(adm)
        order: list[int] = []
        tickets = [adm.ticket() for _ in range(3)]

        async def wait(i: int) -> None:
            await tickets[i].acquire()
            order.append(i)

        tasks = [asyncio.create_task(wait(i)) for i in range(3)]
        await settle()
        holder.release()
        for i in range(3):
            await settle()
            assert order == list(range(i + 1))
            tickets[i].release()
        await asyncio.gather(*tasks)
        assert (adm.active, adm.queued) == (0, 0)

    run(scenario)


def test_a_full_queue_refuses_at_once_with_resource_exhausted() -> None:
    async def scenario() -> None:
        adm = admission(limit=1, queue=1)
        holder = await held(adm)
        queued = asyncio.create_task(adm.ticket().acquire())
        await settle()
        with pytest.raises(QueueFullError, match="--queue-size") as caught:
            await adm.ticket().acquire()
        status = status_for(caught.value)
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert status.detail is not None and status.detail.code == "queue_full"
        assert (adm.active, adm.queued) == (1, 1)  # the refused one left no trace
        queued.cancel()
        holder.release()
        await settle()
        assert (adm.active, adm.queued) == (0, 0)

    run(scenario)


def test_no_queue_refuses_the_second_request() -> None:
    async def scenario() -> None:
        adm = admission(limit=1, queue=0)
        holder = await held(adm)
        with pytest.raises(QueueFullError):
            await adm.ticket().acquire()
        holder.release()
        again = await held(adm)  # the slot came back
        again.release()
        assert adm.active == 0

    run(scenario)


def test_waiting_too_long_is_a_queue_timeout_and_leaves_the_queue() -> None:
    async def scenario() -> None:
        adm = admission(limit=1, queue=1, timeout=0.05)
        holder = await held(adm)
        ticket = adm.ticket()
        with pytest.raises(QueueTimeoutError, match="queue") as caught:
            await ticket.acquire()
        status = status_for(caught.value)
        assert status.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert status.detail is not None and status.detail.code == "queue_timeout"
        assert ticket.waited > 0
        assert (adm.active, adm.queued) == (1, 0)
        ticket.release()  # harmless after a timeout
        holder.release()
        assert adm.active == 0

    run(scenario)


def test_no_limit_admits_everyone() -> None:
    async def scenario() -> None:
        for limit in (0, -1):
            adm = admission(limit=limit, queue=0)
            tickets = [await held(adm) for _ in range(50)]
            assert (adm.active, adm.queued) == (50, 0)
            for t in tickets:
                t.release()
            assert adm.active == 0

    run(scenario)


def test_a_request_cancelled_in_the_queue_gets_no_slot() -> None:
    async def scenario() -> None:
        adm = admission(limit=1)
        holder = await held(adm)
        task = asyncio.create_task(adm.ticket().acquire())
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.queued == 0
        holder.release()
        assert adm.active == 0  # not handed to the cancelled waiter

    run(scenario)


def test_release_from_a_done_callback_ends_the_wait() -> None:
    async def scenario() -> None:
        adm = admission(limit=1)
        holder = await held(adm)
        ticket = adm.ticket()
        task = asyncio.create_task(ticket.acquire())
        await settle()
        ticket.release()  # the call ended while its request was queued
        ticket.release()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert adm.queued == 0
        holder.release()
        assert adm.active == 0

    run(scenario)


def test_release_while_the_slot_is_on_its_way_passes_it_on() -> None:
    async def scenario() -> None:
        adm = admission(limit=1)
        holder = await held(adm)
        late, next_one = adm.ticket(), adm.ticket()
        late_task = asyncio.create_task(late.acquire())
        await settle()
        next_task = asyncio.create_task(next_one.acquire())
        await settle()
        holder.release()  # the slot is handed to ``late``...
        late.release()  # ...whose call ends before it could run
        with pytest.raises(asyncio.CancelledError):
            await late_task
        await next_task  # the slot went on to the next waiter
        assert next_one.holding and adm.active == 1
        next_one.release()
        assert adm.active == 0

    run(scenario)


def test_cancelled_just_as_the_slot_arrives_passes_it_on() -> None:
    async def scenario() -> None:
        adm = admission(limit=1)
        holder = await held(adm)
        task = asyncio.create_task(adm.ticket().acquire())
        await settle()
        holder.release()  # hands the slot over...
        task.cancel()  # ...and the task is cancelled before it resumes
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (adm.active, adm.queued) == (0, 0)

    run(scenario)


def test_release_is_idempotent_and_a_failed_request_gives_its_slot_back() -> None:
    async def scenario() -> None:
        adm = admission(limit=1)
        ticket = adm.ticket()
        with pytest.raises(RuntimeError, match="boom"):
            await ticket.acquire()
            try:
                raise RuntimeError("boom")
            finally:
                ticket.release()
        ticket.release()  # the done-callback's release after the finally's
        assert adm.active == 0
        with pytest.raises(asyncio.CancelledError):
            await ticket.acquire()  # a released ticket is over
        assert adm.active == 0

    run(scenario)


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError, match="queue_size"):
        AdmissionConfig(queue_size=-1)
    with pytest.raises(ValueError, match="queue_timeout_secs"):
        AdmissionConfig(queue_timeout_secs=0)
