"""Steady load for chaos and soak runs: the load generator's streamed OpenAI backend
(``benchmarks.serve``) in a closed loop of ``concurrency`` clients, on a thread of its own so
the caller can kill and restart processes meanwhile.

    load = SteadyLoad(LoadConfig("http://127.0.0.1:8000", concurrency=4), requests)
    load.start()                         # returns once the backend found the model
    t = time.monotonic(); kill_something()
    load.wait_ended(load.in_flight_at(t), timeout=60)
    load.pause(); load.wait_drained(60)  # nothing in flight: pages must all be free now
    outcomes = load.outcomes()
    load.stop()

Every request sent gets exactly one ``Outcome`` (ok, failed with the reason the client saw, or
cancelled by the client), with ``time.monotonic()`` times, so a run can account for all of
them. A request asks for an exact number of tokens (``ignore_eos``): one that "succeeds" with
fewer is counted as failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from benchmarks.serve.backends import Backend
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest, build_dataset
from benchmarks.serve.openai_backend import OpenAIBackend
from benchmarks.serve.tokenizer import load_tokenizer

OK, FAILED, CANCELLED = "ok", "failed", "cancelled"
START_TIMEOUT_S = 30.0  # the backend's first look-up (GET /v1/models)
FAILURE_PAUSE_S = 0.2


@dataclass(frozen=True)
class LoadConfig:
    base_url: str  # the gateway
    concurrency: int = 4
    # the deadline the gateway enforces (its --request-timeout); a request that has not ended
    # by then is past its deadline, however it ends
    deadline_s: float = 30.0
    # the client gives up this long after the deadline (so a hang is seen as one, not cut short)
    client_slack_s: float = 10.0
    cancel_fraction: float = 0.0  # share of requests the client cancels part-way (soak)
    seed: int = 0
    model: str = ""  # empty: the first model GET /v1/models lists

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency={self.concurrency} must be >= 1")
        if not 0.0 <= self.cancel_fraction <= 1.0:
            raise ValueError(f"cancel_fraction={self.cancel_fraction} must be in [0, 1]")
        if self.deadline_s <= 0 or self.client_slack_s < 0:
            raise ValueError("deadline_s must be > 0 and client_slack_s >= 0")


@dataclass
class Outcome:
    id: str  # the request id the gateway was given (x-request-id)
    start: float  # time.monotonic() when sent
    end: float | None = None  # when it ended; None while in flight
    status: str = ""  # OK, FAILED or CANCELLED once ended
    error: str = ""  # what the client saw, for FAILED
    output_tokens: int = 0
    expected_tokens: int = 0

    @property
    def ended(self) -> bool:
        return self.end is not None

    def in_flight_at(self, t: float) -> bool:
        return self.start <= t and (self.end is None or self.end > t)

    def past_deadline(self, deadline_s: float) -> bool:
        """Not ended (output or error) within ``deadline_s`` of its start. A request the client
        cancelled itself is never late."""
        if self.status == CANCELLED:
            return False
        end = self.end if self.end is not None else time.monotonic()
        return end - self.start > deadline_s


def mixed_requests(
    n: int, max_input_len: int, max_output_len: int, seed: int = 0, spread: float = 0.75
) -> list[BenchRequest]:
    """``n`` prompts of random token ids (the load generator's random dataset, sent as ids so
    the server sees exactly the drawn lengths), lengths uniform in ``[max * (1 - spread), max]``
    for prompt and output alike."""
    cfg = ServeBenchConfig(
        dataset="random",
        num_prompts=n,
        input_format="token-ids",
        random_input_len=max_input_len,
        random_output_len=max_output_len,
        random_range_ratio=spread,
        seed=seed,
    )
    return build_dataset(cfg, load_tokenizer(""))


class SteadyLoad:
    def __init__(self, config: LoadConfig, requests: Sequence[BenchRequest]) -> None:
        """``requests``: sent in turn, round and round (each send with a new request id)."""
        if not requests:
            raise ValueError("no requests to send")
        self.config = config
        self._requests = requests
        self._outcomes: list[Outcome] = []
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running: asyncio.Event | None = None  # set: clients send; clear: paused
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    # -- control (from the caller's thread) ----------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError(f"the load did not start within {timeout:.0f}s")
        if self._error is not None:
            raise RuntimeError(f"the load could not start: {self._error}") from self._error

    def pause(self) -> None:
        """Send no new requests (those in flight run on)."""
        self._call(lambda: self._events()[0].clear())

    def resume(self) -> None:
        self._call(lambda: self._events()[0].set())

    def stop(self, timeout: float = 60.0) -> None:
        """Stop sending, let what is in flight end (each within its client timeout), join."""
        if self._thread is None:
            return
        self._call(lambda: self._events()[1].set())
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"the load did not stop within {timeout:.0f}s")
        self._thread = None

    # -- what happened -------------------------------------------------------------------------

    def outcomes(self) -> list[Outcome]:
        """Every request sent so far, in send order (copies: safe to keep)."""
        with self._lock:
            return [Outcome(**vars(o)) for o in self._outcomes]

    def in_flight(self) -> int:
        with self._lock:
            return sum(1 for o in self._outcomes if not o.ended)

    def in_flight_at(self, t: float) -> list[str]:
        """Ids of the requests in flight at monotonic time ``t``."""
        with self._lock:
            return [o.id for o in self._outcomes if o.in_flight_at(t)]

    def count(self, status: str, since: float = 0.0) -> int:
        """Requests that ended with ``status`` after monotonic time ``since``."""
        with self._lock:
            return sum(1 for o in self._outcomes if o.status == status and (o.end or 0.0) > since)

    def wait_ended(self, ids: Iterable[str], timeout: float) -> bool:
        """Until every request in ``ids`` has ended; False if ``timeout`` passed first."""
        wanted = set(ids)
        with self._lock:
            return self._lock.wait_for(
                lambda: all(o.ended for o in self._outcomes if o.id in wanted), timeout
            )

    def wait_drained(self, timeout: float) -> bool:
        """Until nothing is in flight (call ``pause`` first); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: all(o.ended for o in self._outcomes), timeout)

    def wait_count(self, status: str, n: int, since: float, timeout: float) -> bool:
        """Until ``n`` requests ended with ``status`` after ``since``; False on timeout."""
        with self._lock:
            return self._lock.wait_for(
                lambda: (
                    sum(1 for o in self._outcomes if o.status == status and (o.end or 0.0) > since)
                    >= n
                ),
                timeout,
            )

    # -- the load's own thread -----------------------------------------------------------------

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        assert self._running is not None and self._stopping is not None
        return self._running, self._stopping

    def _call(self, fn: Callable[[], None]) -> None:
        if self._loop is None:
            raise RuntimeError("the load is not started")
        self._loop.call_soon_threadsafe(fn)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as e:  # reported by start(), or lost if it failed later
            self._error = e
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running, self._stopping = asyncio.Event(), asyncio.Event()
        self._running.set()
        bench = ServeBenchConfig(
            backend="openai",
            base_url=self.config.base_url,
            model=self.config.model,
            request_timeout=self.config.deadline_s + self.config.client_slack_s,
            ignore_eos=True,
            temperature=0.0,
            progress=False,
        )
        async with OpenAIBackend(bench, chat=False) as backend:
            self._started.set()
            clients = [
                asyncio.create_task(self._client(backend)) for _ in range(self.config.concurrency)
            ]
            await asyncio.gather(*clients)

    async def _client(self, backend: Backend) -> None:
        running, stopping = self._events()
        while not stopping.is_set():
            if not running.is_set():
                paused = asyncio.create_task(running.wait())
                stopped = asyncio.create_task(stopping.wait())
                await asyncio.wait({paused, stopped}, return_when=asyncio.FIRST_COMPLETED)
                paused.cancel()
                stopped.cancel()
                continue
            if not await self._one(backend):
                # a failed request is tried again (as a new one) after a pause, as a client
                # would, rather than in a tight loop against a role that is down
                await asyncio.sleep(FAILURE_PAUSE_S)

    async def _one(self, backend: Backend) -> bool:
        """Send the next request; whether it did not fail."""
        n = next(self._ids)
        req = self._requests[n % len(self._requests)]
        outcome = Outcome(f"chaos-{self.config.seed}-{n}", time.monotonic())
        outcome.expected_tokens = req.output_len
        cancel_after = None
        if self._rng.random() < self.config.cancel_fraction:
            # anywhere from before the first token to near the end of a typical request, so
            # nearly every one chosen is really cancelled mid-way
            cancel_after = self._rng.uniform(0.02, 0.9) * self._typical_s()
        with self._lock:
            self._outcomes.append(outcome)
        send = asyncio.ensure_future(backend.send(req, outcome.id))
        try:
            done, _ = await asyncio.wait({send}, timeout=cancel_after)
            if not done:  # the client walks away: the gateway must cancel it down the mesh
                send.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await send
                self._end(outcome, CANCELLED)
                return True
            result = send.result()
        except BaseException:
            send.cancel()
            self._end(outcome, FAILED, "the load generator stopped")
            raise
        if not result.success:
            self._end(outcome, FAILED, result.error or "failed without a message")
        elif result.output_tokens != req.output_len:
            error = (
                f"ended with {result.output_tokens} of {req.output_len} tokens (finish_reason "
                f"{result.finish_reason!r}, {len(result.text)} characters)"
            )
            self._end(outcome, FAILED, error, result.output_tokens)
        else:
            self._end(outcome, OK, output_tokens=result.output_tokens)
        return outcome.status != FAILED

    def _typical_s(self) -> float:
        """The median duration of the last completed requests (1 s before there are any)."""
        with self._lock:
            recent = [o.end - o.start for o in self._outcomes[-200:] if o.status == OK and o.end]
        return statistics.median(recent) if recent else 1.0

    def _end(self, outcome: Outcome, status: str, error: str = "", output_tokens: int = 0) -> None:
        with self._lock:
            outcome.end = time.monotonic()
            outcome.status = status
            outcome.error = error
            outcome.output_tokens = output_tokens
            self._lock.notify_all()
