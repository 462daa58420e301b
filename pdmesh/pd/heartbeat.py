"""``HeartbeatMonitor``: the decode side's watch over the prefills it holds rooms on.

Every ``interval`` seconds it pings each prefill address that has at least one live room (one
ping per address, however many rooms), with the interval as the ping's deadline so a hung
prefill counts as a miss, not a stall. After ``max_failures`` consecutive misses every room on
that prefill fails at once with "lost prefill <addr>: N heartbeats missed"; the rest keep
going. A ping answered by a different instance id means the prefill restarted behind the same
address and lost its rooms: those rooms fail at once too. Either way ``on_lost`` is told, so the
registration with that prefill is redone on its next room.

Detection takes at most about ``interval × (max_failures + 1)``: the pings run on a fixed
schedule and each ends within one interval. A prefill that dies outright is usually noticed
sooner, by its broken Transfer stream; the heartbeat is what catches a prefill that hangs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from pdmesh.errors import PeerUnavailableError

log = logging.getLogger(__name__)

Ping = Callable[[str, float], Awaitable[str]]  # (address, timeout) -> instance id


@dataclass(eq=False)
class Watch:
    """One room's claim on a prefill: ``lost`` fails (with the reason) when the prefill does."""

    address: str
    lost: asyncio.Future[None] = field(repr=False)
    # the instance the room was registered with; None until known (any instance will do)
    instance_id: str | None = None

    @property
    def error(self) -> BaseException | None:
        return self.lost.exception() if self.lost.done() else None


class HeartbeatMonitor:
    def __init__(
        self,
        ping: Ping,
        interval: float,
        max_failures: int,
        on_lost: Callable[[str], None] = lambda address: None,
    ) -> None:
        if interval <= 0 or max_failures < 1:
            raise ValueError(f"interval={interval} must be > 0, max_failures={max_failures} >= 1")
        self._ping = ping
        self.interval = interval
        self.max_failures = max_failures
        self._on_lost = on_lost
        self._watches: dict[str, set[Watch]] = {}  # by prefill address
        self._misses: dict[str, int] = {}  # consecutive missed pings per address
        self._task: asyncio.Task[None] | None = None

    @property
    def addresses(self) -> list[str]:
        """Prefills with live rooms (the ones being pinged)."""
        return list(self._watches)

    def watch(self, address: str, instance_id: str | None = None) -> Watch:
        w = Watch(address, asyncio.get_running_loop().create_future(), instance_id)
        w.lost.add_done_callback(lambda f: f.cancelled() or f.exception())  # read or not
        self._watches.setdefault(address, set()).add(w)
        return w

    def release(self, w: Watch) -> None:
        """The room ended: stop pinging for it."""
        watches = self._watches.get(w.address)
        if watches is None:
            return
        watches.discard(w)
        if not watches:
            del self._watches[w.address]
            self._misses.pop(w.address, None)

    async def tick(self) -> None:
        """One round: ping every watched prefill once and act on the answers."""
        addresses = self.addresses
        answers = await asyncio.gather(*(self._ping_one(a) for a in addresses))
        for address, answer in zip(addresses, answers):
            if isinstance(answer, str):
                self._answered(address, answer)
            else:
                self._missed(address, answer)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += self.interval
            try:
                await self.tick()
            except Exception:  # a bug here must not end heartbeats for good
                log.exception("heartbeat round failed")
            await asyncio.sleep(max(0.0, due - loop.time()))

    async def _ping_one(self, address: str) -> str | BaseException:
        try:
            return await asyncio.wait_for(self._ping(address, self.interval), self.interval)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # refused, unavailable, timed out: all misses
            return e

    def _answered(self, address: str, instance_id: str) -> None:
        self._misses[address] = 0
        stale = [
            w
            for w in self._watches.get(address, ())
            if w.instance_id is not None and w.instance_id != instance_id
        ]
        if not stale:
            return
        old = stale[0].instance_id or ""
        log.warning("prefill %s restarted (instance %s -> %s)", address, old[:8], instance_id[:8])
        self._fail(
            address,
            stale,
            PeerUnavailableError(
                f"prefill {address} restarted (instance {old[:8]} -> {instance_id[:8]}) and lost "
                "its rooms"
            ),
        )

    def _missed(self, address: str, error: BaseException) -> None:
        misses = self._misses.get(address, 0) + 1
        self._misses[address] = misses
        reason = _describe(error)
        log.info(
            "heartbeat %d/%d to prefill %s missed: %s", misses, self.max_failures, address, reason
        )
        if misses < self.max_failures:
            return
        watches = list(self._watches.get(address, ()))
        log.warning("lost prefill %s: failing its %d room(s)", address, len(watches))
        self._fail(
            address,
            watches,
            PeerUnavailableError(
                f"lost prefill {address}: {misses} heartbeats missed (last: {reason})"
            ),
        )
        self._misses[address] = 0

    def _fail(self, address: str, watches: list[Watch], error: Exception) -> None:
        for w in watches:
            if not w.lost.done():
                w.lost.set_exception(error)
            self.release(w)
        self._on_lost(address)


def _describe(error: BaseException) -> str:
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return "no answer in time"
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    if callable(code) and callable(details):  # a grpc error, without importing grpc here
        return f"{code().name}: {details()}"
    return f"{type(error).__name__}: {error}"
