"""The prefill side's room table and bootstrap logic (``pdmesh.pd.rooms``, ``.bootstrap``,
``.registry``): no engine, no network; asyncio with short real timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.errors import (
    AbortedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidRequestError,
    PeerUnavailableError,
    RequestNotFoundError,
)
from pdmesh.kv_transfer import ReceiverHandle
from pdmesh.pd.bootstrap import Bootstrap
from pdmesh.pd.budget import OptimisticBudget
from pdmesh.pd.registry import DecodePeer, DecodeRegistry, by_backend
from pdmesh.pd.rooms import Destination, RoomState, RoomTable
from pdmesh.pd.values import WRITING, FirstToken

T = TypeVar("T")
FIRST = FirstToken(token_id=7, logprob=None, num_cached_tokens=3)
DEST = Destination("decode-1", (4, 5), "req-d")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), 10))


def layout(**changes: Any) -> KVLayout:
    base = dict(
        base_ptr=0,
        total_bytes=0,
        num_layers=30,
        num_pages=64,
        page_size=16,
        num_kv_heads=3,
        head_dim=64,
        dtype="float32",
        device="cpu",
    )
    return KVLayout(**{**base, **changes})  # type: ignore[arg-type]


def peer(decode_id: str = "decode-1", backend: str = "grpc", **changes: Any) -> DecodePeer:
    handle = ReceiverHandle(backend, "127.0.0.1:1", "rid", layout(**changes))
    return DecodePeer(decode_id, "127.0.0.1:2", handle)


# ------------------------------------------------------------------------ the two halves meet


@pytest.mark.parametrize("prefill_first", [True, False])
def test_a_room_is_created_by_whichever_half_comes_first(prefill_first: bool) -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        if prefill_first:
            room = table.join_prefill(1, "req-p")
            assert room.state is RoomState.WAITING and len(table) == 1
            assert table.join_decode(1, DEST) is room
        else:
            room = table.join_decode(1, DEST)
            assert room.state is RoomState.WAITING and len(table) == 1
            assert table.join_prefill(1, "req-p") is room
        assert room.state is RoomState.READY
        assert await room.destination() == DEST
        assert room.timer is not None and room.timer.cancelled()  # the bootstrap is over

        events: list[Any] = []

        async def decode_side() -> None:
            async for event in Bootstrap.events(room):
                events.append(event)

        listener = asyncio.ensure_future(decode_side())
        await asyncio.sleep(0)
        room.start_write()
        room.finish_write(FIRST)
        await listener
        assert events == [WRITING, FIRST]
        assert room.state is RoomState.DONE
        assert len(table) == 0  # a room leaves the table when it ends

    run(scenario)


def test_a_room_without_its_second_half_times_out_and_tells_the_waiter() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=0.05)
        room = table.join_prefill(1, "req-p")
        with pytest.raises(DeadlineExceededError, match="decode's page ids.*0.05s"):
            await room.guard(room.destination())
        assert room.state is RoomState.FAILED and len(table) == 0

        lonely = table.join_decode(2, DEST)  # the decode came, the prefill never did
        with pytest.raises(DeadlineExceededError, match="prefill request"):
            await lonely.outcome()

    run(scenario)


def test_a_half_arriving_after_the_room_failed_fails_at_once() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        room = table.join_prefill(1, "req-p")
        room.fail(AbortedError("the prefill request was cancelled"))
        with pytest.raises(AbortedError, match="cancelled"):  # not a fresh room that waits 5 s
            table.join_decode(1, DEST)
        assert len(table) == 0

    run(scenario)


def test_tombstones_expire_with_the_bootstrap_timeout() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=0.05)
        table.join_prefill(1, "req-p").fail(AbortedError("x"))
        await asyncio.sleep(0.1)
        room = table.join_prefill(1, "req-again")
        assert room.state is RoomState.WAITING

    run(scenario)


def test_a_room_taken_twice_is_refused() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        table.join_prefill(1, "req-p")
        with pytest.raises(InvalidRequestError, match="already taken") as e:
            table.join_prefill(1, "req-other")
        assert e.value.field == "disagg.bootstrap_room"
        table.join_decode(1, DEST)
        with pytest.raises(InvalidRequestError, match="already has a decode"):
            table.join_decode(1, DEST)

    run(scenario)


# ------------------------------------------------------------------------ failures and writes


def test_a_failure_stops_a_guarded_prefill_midway() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        room = table.join_prefill(1, "req-p")
        stopped = asyncio.Event()

        async def long_prefill() -> None:
            try:
                await asyncio.sleep(60)
            finally:
                stopped.set()

        guarded = asyncio.ensure_future(room.guard(long_prefill()))
        await asyncio.sleep(0.01)
        room.fail(AbortedError("decode d cancelled"))
        with pytest.raises(AbortedError, match="decode d cancelled"):
            await guarded
        assert stopped.is_set()  # cancelled, not left running

    run(scenario)


def test_a_failure_while_writing_waits_for_the_write_to_end() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        table.join_decode(1, DEST)
        room = table.join_prefill(1, "req-p")
        room.start_write()
        assert room.fail(AbortedError("decode cancelled"))
        assert room.state is RoomState.WRITING  # the decode must not free its pages yet
        outcome = asyncio.ensure_future(room.outcome())
        await asyncio.sleep(0.01)
        assert not outcome.done()
        room.finish_write(FIRST)  # the write ended: now the recorded failure wins
        with pytest.raises(AbortedError, match="decode cancelled"):
            await outcome
        assert room.state is RoomState.FAILED and len(table) == 0

    run(scenario)


def test_a_failed_write_fails_the_room() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        table.join_decode(1, DEST)
        room = table.join_prefill(1, "req-p")
        room.start_write()
        room.fail_write(PeerUnavailableError("KV transfer to decode x failed"))
        with pytest.raises(PeerUnavailableError, match="KV transfer"):
            await room.outcome()

    run(scenario)


def test_an_ended_room_ignores_later_failures() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        table.join_decode(1, DEST)
        room = table.join_prefill(1, "req-p")
        room.start_write()
        room.finish_write(FIRST)
        assert not room.fail(AbortedError("late cancel"))
        assert await room.outcome() == FIRST

    run(scenario)


def test_fail_all_fails_every_live_room() -> None:
    async def scenario() -> None:
        table = RoomTable(bootstrap_timeout=5)
        rooms = [table.join_prefill(i, f"r{i}") for i in range(3)]
        table.fail_all(AbortedError("shutting down"))
        assert all(r.state is RoomState.FAILED for r in rooms) and len(table) == 0

    run(scenario)


# ------------------------------------------------------------------------ registry, bootstrap


def test_registration_refuses_every_layout_mismatch_by_name() -> None:
    registry = DecodeRegistry(layout(), by_backend("grpc"))
    with pytest.raises(FailedPreconditionError) as e:
        registry.register(peer(page_size=32, dtype="bfloat16", num_layers=2))
    message = str(e.value)
    for expected in ("page_size: 16 != 32", "dtype: float32 != bfloat16", "num_layers: 30 != 2"):
        assert expected in message
    with pytest.raises(FailedPreconditionError, match="'mooncake' transfer backend"):
        registry.register(peer(backend="mooncake"))
    assert len(registry) == 0
    registry.register(peer(num_pages=8))  # the pool size may differ
    assert registry.get("decode-1").layout.num_pages == 8


def test_an_unregistered_decode_is_not_found() -> None:
    registry = DecodeRegistry(layout(), by_backend("grpc"))
    with pytest.raises(RequestNotFoundError, match="not registered"):
        registry.get("nobody")


def test_bootstrap_checks_destination_pages_against_the_decode_pool() -> None:
    async def scenario() -> None:
        bootstrap = Bootstrap(RoomTable(5), DecodeRegistry(layout(), by_backend("grpc")))
        instance = bootstrap.register(peer(num_pages=8))
        assert instance == bootstrap.instance_id and len(instance) == 32
        with pytest.raises(InvalidRequestError, match=r"\[8\] outside"):
            bootstrap.attach(1, "decode-1", "r", [3, 8])
        with pytest.raises(InvalidRequestError, match="must not be empty"):
            bootstrap.attach(1, "decode-1", "r", [])
        room = bootstrap.attach(1, "decode-1", "r", [3, 4])
        Bootstrap.abandon(room, "decode-1")
        with pytest.raises(AbortedError, match="decode decode-1 cancelled"):
            await room.outcome()

    run(scenario)


# ------------------------------------------------------------------------ optimistic budget


def test_the_optimistic_budget_caps_pages_of_rooms_without_a_destination() -> None:
    budget = OptimisticBudget(num_pages=48, page_size=16, share=0.5)
    assert budget.capacity == 24
    first = budget.try_reserve(16 * 10)  # 10 pages
    second = budget.try_reserve(16 * 10 + 1)  # 11 pages
    assert (first, second) == (10, 11)
    assert budget.try_reserve(16 * 4) == 0  # 25 > 24: this room waits for its decode first
    budget.release(first)
    assert budget.try_reserve(16 * 4) == 4
    assert OptimisticBudget(48, 16, share=0.0).try_reserve(1) == 0  # 0 = never optimistic
    with pytest.raises(ValueError):
        OptimisticBudget(48, 16, share=1.5)
