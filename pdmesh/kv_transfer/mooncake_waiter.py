"""One thread that waits for the Mooncake transfers of every write in flight.

Mooncake says that a transfer ended only when asked (``transfer_check_status``), so something
must poll. A write submits its blocks on the event loop, hands their batch ids to
``TransferWaiter.add`` and awaits the future it gets back; this module's thread checks every
pending write's batches, sleeps 20 us then 50 us between rounds (with Linux's default 50 us
timer slack: a round every ~70-100 us), and resolves a write's future with a return code once
its batches have all ended or its deadline has passed.

Why so often: on the 2-core test VMs, rounds every ~0.1 ms made 2.8-45 MiB rooms 5-15% faster
than rounds every ~0.25 ms (a 0.2 ms cap) in most runs, alike or a few % slower in the others,
though each round takes the CPU from Mooncake's I/O threads for a moment: detection comes
sooner, and probably a vCPU that never idles long wakes those threads faster (the guest halts
idle vCPUs). It costs ~5% of a core while transfers are in flight, nothing when none is.

Why one thread rather than a wait per write on a thread pool: the pool's hop and the
``wait_for``/``shield`` around it cost ~0.05-0.2 ms per write on a 2-core host, 5-15% of a
1.4 MiB room's write (``python -m benchmarks.kv_transfer --backends mooncake,raw``); and a
pool's queue can hold a wait past its deadline when more writes are in flight than it has
threads, where this thread looks at every write each round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

TIMED_OUT = -1000  # our own code for "the deadline passed" (Mooncake's codes are -1, -2)
_POLL_MIN_S = 20e-6
_POLL_MAX_S = 50e-6


@dataclass
class _Write:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[int]
    batch_ids: deque[int]
    rc: int  # 0, or the first failure seen (the submit's, or a transfer's)
    deadline: float  # time.monotonic()


class TransferWaiter:
    """``check_status`` is ``TransferEngine.transfer_check_status``: 1 done, 0 running, -1
    failed (the batch is freed by the call that says so), -2 Mooncake's own timeout (not
    freed)."""

    def __init__(self, check_status: Callable[[int], int]) -> None:
        self._check = check_status
        self._cond = threading.Condition()
        self._pending: list[_Write] = []
        self._arrived = False  # a write came since the last round: look again soon
        self._stopping = False
        self._thread: threading.Thread | None = None
        # batches given up at their deadline: Mooncake may still read our memory for them.
        # Only the thread touches it until stop() has joined it.
        self.abandoned: list[int] = []

    def add(
        self, loop: asyncio.AbstractEventLoop, batch_ids: list[int], rc: int, deadline: float
    ) -> asyncio.Future[int]:
        """Wait for ``batch_ids`` (submitted already, so they are waited for even when the
        caller stops listening); the future gets 0 when all succeeded, else the first failure's
        code or ``TIMED_OUT``. ``rc`` is a code to report whatever the transfers do (a submit
        that failed half way). Callable from any thread; ``loop`` runs the future's callbacks."""
        future: asyncio.Future[int] = loop.create_future()
        write = _Write(loop, future, deque(batch_ids), rc, deadline)
        if not batch_ids:
            _resolve(write, rc)
            return future
        with self._cond:
            if self._stopping:
                raise RuntimeError("the transfer waiter is stopped")
            self._pending.append(write)
            self._arrived = True
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="mooncake-waiter", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return future

    def stop(self) -> None:
        """Return once every pending write has ended (each does by its deadline); blocks."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        pause = _POLL_MIN_S
        while True:
            with self._cond:
                while not self._pending:
                    if self._stopping:
                        return
                    self._cond.wait()
                if self._arrived:  # its transfer may be short: do not keep a long pause
                    self._arrived = False
                    pause = _POLL_MIN_S
                writes = list(self._pending)
            ended = [w for w in writes if self._poll(w)]
            with self._cond:
                for w in ended:
                    self._pending.remove(w)
                if self._pending and not self._arrived:
                    self._cond.wait(pause)  # add() cuts it short
                    pause = min(pause * 2, _POLL_MAX_S)

    def _poll(self, write: _Write) -> bool:
        """Look at ``write``'s batches; True (and its future resolved) once it has ended."""
        try:
            # in order: blocks finish roughly in submission order, so one look covers most
            while write.batch_ids:
                status = self._check(write.batch_ids[0])
                if status == 0:  # still running
                    if time.monotonic() <= write.deadline:
                        return False
                    self.abandoned.extend(write.batch_ids)
                    _resolve(write, TIMED_OUT)
                    return True
                if status == -2:  # Mooncake's own timeout; its batch is not freed by the check
                    self.abandoned.append(write.batch_ids[0])
                write.batch_ids.popleft()  # done or failed: Mooncake freed the batch
                if status != 1 and write.rc == 0:
                    write.rc = status
        except Exception:  # the thread must live on: every other write waits on it
            log.exception("checking a mooncake transfer failed")
            _resolve(write, -1)
            return True
        _resolve(write, write.rc)
        return True


def _resolve(write: _Write, rc: int) -> None:
    # RuntimeError: the loop is closed, nobody awaits the future any more
    with contextlib.suppress(RuntimeError):
        write.loop.call_soon_threadsafe(_set_result, write.future, rc)


def _set_result(future: asyncio.Future[int], rc: int) -> None:
    if not future.done():  # a cancelled write no longer listens
        future.set_result(rc)
