"""``pdmesh.pd.heartbeat.HeartbeatMonitor`` driven by hand (``tick``) against a fake ping: no
network, no sleeping except where the schedule itself is under test."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from pdmesh.errors import PeerUnavailableError
from pdmesh.pd.heartbeat import HeartbeatMonitor

T = TypeVar("T")


def run(scenario: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(asyncio.wait_for(scenario(), 10))


class FakePrefills:
    """Answers pings: an instance id per address, or an error for the ones marked down."""

    def __init__(self) -> None:
        self.instances = {"a:1": "inst-a", "b:1": "inst-b"}
        self.down: set[str] = set()
        self.hung: set[str] = set()
        self.pings: list[str] = []

    async def ping(self, address: str, timeout: float) -> str:
        self.pings.append(address)
        if address in self.hung:
            await asyncio.sleep(60)
        if address in self.down:
            raise ConnectionRefusedError(f"{address} refused")
        return self.instances[address]


def monitor(prefills: FakePrefills, lost: list[str], **kw: float) -> HeartbeatMonitor:
    return HeartbeatMonitor(
        prefills.ping,
        interval=kw.get("interval", 0.05),
        max_failures=int(kw.get("max_failures", 2)),
        on_lost=lost.append,
    )


def test_only_prefills_with_rooms_are_pinged_once_each() -> None:
    async def scenario() -> None:
        prefills, lost = FakePrefills(), []
        mon = monitor(prefills, lost)
        await mon.tick()
        assert prefills.pings == []  # no rooms, no pings
        w1, w2 = mon.watch("a:1", "inst-a"), mon.watch("a:1", "inst-a")
        await mon.tick()
        assert prefills.pings == ["a:1"]  # one ping per address, however many rooms
        mon.release(w1)
        mon.release(w2)
        await mon.tick()
        assert prefills.pings == ["a:1"] and mon.addresses == []

    run(scenario)


def test_max_failures_misses_fail_every_room_of_that_prefill_and_only_those() -> None:
    async def scenario() -> None:
        prefills, lost = FakePrefills(), []
        mon = monitor(prefills, lost, max_failures=2)
        on_a = [mon.watch("a:1", "inst-a") for _ in range(3)]
        on_b = mon.watch("b:1", "inst-b")
        prefills.down.add("a:1")
        await mon.tick()
        assert not any(w.lost.done() for w in on_a)  # one miss is not a loss
        await mon.tick()
        for w in on_a:
            with pytest.raises(
                PeerUnavailableError, match=r"lost prefill a:1: 2 heartbeats missed"
            ):
                await w.lost
        assert not on_b.lost.done()
        assert lost == ["a:1"]
        assert mon.addresses == ["b:1"]  # the lost prefill's rooms are released

    run(scenario)


def test_an_answer_resets_the_miss_count() -> None:
    async def scenario() -> None:
        prefills, lost = FakePrefills(), []
        mon = monitor(prefills, lost, max_failures=2)
        w = mon.watch("a:1", "inst-a")
        for _ in range(3):  # miss, answer, miss, answer...: never two in a row
            prefills.down.add("a:1")
            await mon.tick()
            prefills.down.discard("a:1")
            await mon.tick()
        assert not w.lost.done() and lost == []

    run(scenario)


def test_a_hung_prefill_counts_as_a_miss_within_the_interval() -> None:
    async def scenario() -> None:
        prefills, lost = FakePrefills(), []
        mon = monitor(prefills, lost, interval=0.05, max_failures=1)
        w = mon.watch("a:1", "inst-a")
        prefills.hung.add("a:1")
        loop = asyncio.get_running_loop()
        start = loop.time()
        await mon.tick()
        assert loop.time() - start < 1.0  # the ping's deadline is the interval
        with pytest.raises(PeerUnavailableError, match="no answer in time"):
            await w.lost

    run(scenario)


def test_a_restarted_prefill_fails_the_rooms_of_its_old_instance_at_once() -> None:
    async def scenario() -> None:
        prefills, lost = FakePrefills(), []
        mon = monitor(prefills, lost, max_failures=5)
        old = mon.watch("a:1", "inst-a")
        prefills.instances["a:1"] = "inst-a2"
        new = mon.watch("a:1", "inst-a2")  # registered again after the restart
        await mon.tick()
        with pytest.raises(PeerUnavailableError, match="restarted"):
            await old.lost
        assert not new.lost.done()
        assert lost == ["a:1"]  # so the registration is redone

    run(scenario)


def test_the_background_loop_detects_a_loss_within_interval_times_max_failures_plus_one() -> None:
    async def scenario() -> None:
        prefills, lost = FakePrefills(), []
        mon = monitor(prefills, lost, interval=0.05, max_failures=2)
        w = mon.watch("a:1", "inst-a")
        mon.start()
        try:
            await asyncio.sleep(0.12)
            loop = asyncio.get_running_loop()
            prefills.hung.add("a:1")
            start = loop.time()
            with pytest.raises(PeerUnavailableError):
                await w.lost
            assert loop.time() - start <= 0.05 * 3 + 0.1
        finally:
            await mon.stop()

    run(scenario)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        HeartbeatMonitor(FakePrefills().ping, interval=0, max_failures=2)
    with pytest.raises(ValueError):
        HeartbeatMonitor(FakePrefills().ping, interval=1, max_failures=0)
