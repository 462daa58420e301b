"""``EngineProcess``: the engine in a process of its own, behind ``AsyncEngine``'s API.

NOTE: why. In one process the engine thread's Python step work (schedule, prepare the batch,
sample, update: ~1.5 ms a step at batch 256) and the gRPC event loop's per-token work share one
GIL, so on a GPU each waits for the other and the worker, not the GPU, sets the step time. SGLang
runs its scheduler and vLLM its EngineCore in a process of their own for this reason; here the
worker's gRPC process keeps the streams, deadlines, spans and metrics, and the engine process
only steps.

The two talk over one ``multiprocessing`` pipe (a socketpair). Down: ``(call_id, Command)``
tuples, the same ``LLMEngine`` method names ``AsyncEngine`` runs on its thread, or ``None`` to
stop. Up, in the engine's order: ``("out", [RequestOutput, ...])`` once per step (and a start's
first output), ``("reply", call_id, ok, value)``, ``("crash", message)``. One message per step
whatever the batch, so the pipe costs per step, not per token. A reader thread in the gRPC
process waits on the pipe (without the GIL) and hands each message to the event loop.

Grammars compile on a small pool inside the engine process (the cache lives with the engine);
a request waits there, off the step loop, until its grammar is ready, as with the thread.

Only aggregated workers run it: the PD sides reach into the engine's KV memory (transfer
engines registered on it, pages read and written), which stays in the process that owns it.

With ``--tp-size N`` this process is rank 0 of N engine processes (``tp_ranks``): the worker
starts all N, talks to rank 0 only, and watches the others, so that the death of any rank is
the engine's death.

If the engine process dies, every request in flight and every later call fails with
``EngineDeadError`` and ``on_death`` runs (the worker stops, so it leaves the mesh); if the gRPC
process dies, the engine process sees the pipe close and exits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdmesh.distributed.spawn import free_port
from pdmesh.engine.async_engine import STARTS, AsyncEngine, Command
from pdmesh.engine.config import EngineConfig
from pdmesh.engine.kv_cache import KVLayout
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.engine.tp_ranks import StepSync, TPLaunch, follower_main
from pdmesh.errors import EngineDeadError, FailedPreconditionError
from pdmesh.models.source import ModelSource

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long the idle engine process waits on its pipe between checks
DEFAULT_START_TIMEOUT_S = 900.0  # model load + CUDA graph capture of a large model
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class EngineFacts:
    """``EngineInfo`` as the engine process sends it once loaded."""

    source: ModelSource
    config: EngineConfig
    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    layout: KVLayout

    def kv_layout(self) -> KVLayout:
        return self.layout


class EngineProcess(AsyncEngine):
    """``AsyncEngine`` whose engine runs in a child process (see the module docstring)."""

    def __init__(
        self, config: EngineConfig, on_death: Callable[[BaseException], None] | None = None
    ) -> None:
        """``on_death``: called on the event loop once, if the engine process dies."""
        super().__init__(None)  # type: ignore[arg-type]  # no engine in this process
        self._config = config
        self._on_death = on_death
        self._facts: EngineFacts | None = None
        self._proc: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._replies: dict[int, concurrent.futures.Future[Any]] = {}
        self._reader: threading.Thread | None = None
        self._followers: list[multiprocessing.process.BaseProcess] = []  # tp ranks 1..N-1
        self._rank_died: str | None = None  # which tp rank took the engine down
        self._watcher: threading.Thread | None = None

    # -- life -----------------------------------------------------------------------------

    def launch(self, timeout: float = DEFAULT_START_TIMEOUT_S) -> EngineFacts:
        """Start the engine process and wait until its engine is loaded (blocking: call it
        before serving). Raises ``RuntimeError`` with the child's reason if it cannot load."""
        ctx = multiprocessing.get_context("spawn")  # fork would copy CUDA and gRPC state
        size = self._config.tp_size
        init = f"tcp://127.0.0.1:{free_port()}"
        ready: list[multiprocessing.connection.Connection] = []
        for rank in range(1, size):
            parent, child = ctx.Pipe(duplex=False)
            proc: multiprocessing.process.BaseProcess = ctx.Process(
                target=follower_main,
                args=(self._config, TPLaunch(rank, size, init), child),
                name=f"pdmesh-engine-tp{rank}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._followers.append(proc)
            ready.append(parent)
        parent, child = ctx.Pipe(duplex=True)
        launch = TPLaunch(0, size, init) if size > 1 else None
        self._proc = ctx.Process(
            target=_engine_main,
            args=(self._config, child, launch),
            name="pdmesh-engine",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent
        deadline = time.monotonic() + timeout
        try:
            ranks = [("the engine process", self._proc, parent)] + [
                (f"tp rank {rank}", proc, conn)
                for rank, (proc, conn) in enumerate(zip(self._followers, ready), start=1)
            ]
            self._facts = _await_ready(ranks, deadline, timeout)[0]
        except RuntimeError:
            self._kill_all()
            raise
        if self._followers:
            self._watcher = threading.Thread(
                target=self._watch_ranks, name="pdmesh-tp-watch", daemon=True
            )
            self._watcher.start()
        log.info(
            "engine process %d ready%s",
            self._proc.pid,
            f" (rank 0 of {size}; ranks {[p.pid for p in self._followers]})" if size > 1 else "",
        )
        return self._facts

    def _watch_ranks(self) -> None:
        """A tp rank that exits takes the engine down: rank 0 is killed, and its pipe's end
        fails every request with the rank named (not after a collective's timeout)."""
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self._followers, start=1)}
        ready = multiprocessing.connection.wait(list(sentinels))
        if self._stop.is_set():
            return
        # a sentinel fires as the process closes its files, a moment before it can be reaped:
        # join it for its exit code. The first to go, as far as can be told: a signal's victim
        # before ranks that exited on their own because a collective with it broke
        gone = [sentinels[s] for s in ready if s in sentinels]
        for _, proc in gone:
            proc.join(1.0)
        rank, proc = min(gone, key=lambda rp: ((rp[1].exitcode or 0) >= 0, rp[0]))
        self._rank_died = f"tp rank {rank} exited (code {proc.exitcode})"
        log.error("%s: stopping the engine's other ranks", self._rank_died)
        self._kill_all()

    def _kill_all(self) -> None:
        for proc in [self._proc, *self._followers]:
            if proc is not None and proc.is_alive():
                proc.kill()

    def start(self) -> None:
        assert self._conn is not None, "launch() first"
        self._loop = asyncio.get_running_loop()
        self._reader = threading.Thread(target=self._read, name="pdmesh-engine-pipe", daemon=True)
        self._reader.start()

    def shutdown(self, timeout: float = _STOP_TIMEOUT_S) -> None:
        self._stop.set()
        if self._conn is not None and self._proc is not None and self._proc.is_alive():
            with contextlib.suppress(OSError), self._send_lock:
                self._conn.send(None)  # rank 0 tells the other ranks
        for proc in [self._proc, *self._followers]:
            if proc is None:
                continue
            proc.join(timeout)
            if proc.is_alive():
                log.warning("engine process %d did not stop in %.0fs: killed", proc.pid, timeout)
                proc.kill()
                proc.join(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._compile_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def rank_pids(self) -> list[int | None]:
        """The process of each tp rank, rank 0 (``pid``) first."""
        return [p.pid for p in [self._proc, *self._followers] if p is not None]

    @property
    def info(self) -> EngineFacts:
        assert self._facts is not None, "launch() first"
        return self._facts

    # -- AsyncEngine's hooks --------------------------------------------------------------

    async def prepare(self, params: SamplingParams) -> None:
        return None  # grammars compile in the engine process, next to their cache

    def _compile_job(self, params: SamplingParams) -> None:
        return None

    async def allocate_incoming(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> list[int]:
        raise FailedPreconditionError("PD runs the engine in the worker's own process")

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        raise FailedPreconditionError("the engine runs in its own process: send a Command")

    def _send(self, command: Command) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        if self._dead is not None:
            fut.set_exception(EngineDeadError(f"engine stopped: {self._dead}"))
            return fut
        assert self._conn is not None
        call_id = next(self._ids)
        self._replies[call_id] = fut
        try:
            with self._send_lock:
                self._conn.send((call_id, command))
        except (OSError, ValueError) as e:  # the pipe is gone: the reader fails everything
            self._replies.pop(call_id, None)
            fut.set_exception(EngineDeadError(f"engine process unreachable: {e}"))
        return fut

    # -- the reader thread ----------------------------------------------------------------

    def _read(self) -> None:
        assert self._conn is not None
        reason = "engine process exited"
        try:
            while True:
                message = self._conn.recv()
                kind = message[0]
                if kind == "out":
                    self._emit(message[1])
                elif kind == "reply":
                    _, call_id, ok, value = message
                    fut = self._replies.pop(call_id, None)
                    if fut is not None:
                        if ok:
                            fut.set_result(value)
                        else:
                            fut.set_exception(value)
                elif kind == "crash":
                    reason = f"engine loop crashed: {message[1]}"
        except (EOFError, OSError):
            pass
        if self._stop.is_set():
            self._dead = EngineDeadError("engine shut down")
            self._fail_all(self._dead)
            return
        code = self._proc.exitcode if self._proc is not None else None
        if self._proc is not None:
            self._proc.join(1.0)
            code = self._proc.exitcode
        if self._watcher is not None:
            # rank 0 may see a dead rank first (its collective breaks): give the watcher the
            # moment it needs to name the rank
            self._watcher.join(1.0)
        if self._rank_died is not None:
            reason = f"{self._rank_died}; rank 0: {reason}"
        error = EngineDeadError(f"{reason} (exit code {code})")
        log.error("%s: failing every request", error)
        self._dead = error
        self._fail_all(error)
        if self._on_death is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._on_death, error)

    def _fail_all(self, error: BaseException) -> None:
        replies, self._replies = self._replies, {}
        for fut in replies.values():
            if not fut.done():
                fut.set_exception(error)
        super()._fail_all(error)


# -- the engine process ---------------------------------------------------------------------


def _await_ready(
    ranks: list[
        tuple[str, multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]
    ],
    deadline: float,
    timeout: float,
) -> list[Any]:
    """What each process sends once its engine is loaded, in order; raises ``RuntimeError``
    with the reason of the first that sends an error, exits or takes past ``deadline`` (all
    are waited on at once: a tp rank that fails leaves the others blocked in a collective)."""
    got: dict[int, Any] = {}
    while len(got) < len(ranks):
        for i, (what, proc, conn) in enumerate(ranks):
            if i in got or not conn.poll(0):
                if i not in got and not proc.is_alive() and not conn.poll(0):
                    raise RuntimeError(f"{what} exited with code {proc.exitcode}")
                continue
            try:
                kind, value = conn.recv()
            except EOFError:
                proc.join(_STOP_TIMEOUT_S)
                raise RuntimeError(f"{what} exited with code {proc.exitcode}") from None
            if kind != "ready":
                raise RuntimeError(value)
            got[i] = value
        if time.monotonic() > deadline:
            raise RuntimeError(f"the engine did not load within {timeout:.0f}s")
        if len(got) < len(ranks):
            multiprocessing.connection.wait(
                [c for i, (_, _, c) in enumerate(ranks) if i not in got], timeout=0.2
            )
    return [got[i] for i in range(len(ranks))]


def _engine_main(
    config: EngineConfig, conn: multiprocessing.connection.Connection, launch: TPLaunch | None
) -> None:
    from pdmesh.distributed import TPGroup
    from pdmesh.engine.llm_engine import LLMEngine
    from pdmesh.rpc.server import configure_logging

    configure_logging(os.environ.get("PDMESH_ENGINE_LOG_LEVEL", "info"))
    try:
        tp = launch.join(config) if launch is not None else TPGroup.single()
        engine = LLMEngine(config.for_rank(0), None, tp)
    except BaseException as e:  # bad model, no memory: the parent reports it and exits
        conn.send(("error", f"cannot load the engine for {config.model!r}: {e}"))
        return
    facts = EngineFacts(
        engine.source,
        engine.config,
        engine.vocab_size,
        engine.max_model_len,
        engine.eos_token_ids,
        engine.kv_layout(),
    )
    conn.send(("ready", facts))
    try:
        _EngineLoop(engine, conn, StepSync(tp)).run()
    finally:
        tp.close()


class _EngineLoop:
    """The engine process's loop: the pipe's commands between steps, one message per step."""

    def __init__(
        self, engine: Any, conn: multiprocessing.connection.Connection, sync: StepSync
    ) -> None:
        self.engine = engine
        self.conn = conn
        self.sync = sync  # the other tp ranks (none: size 1)
        self.compiled: queue.SimpleQueue[tuple[int, Command, BaseException | None]] = (
            queue.SimpleQueue()
        )
        self.pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="pdmesh-grammar")

    def run(self) -> None:
        try:
            while self._commands(block=not self.engine.has_work or self.engine.stalled):
                will_step = self.engine.has_work
                self.sync.step(will_step)
                if will_step:
                    outputs = self.engine.step()
                    if outputs:
                        self.conn.send(("out", outputs))
            self.sync.stop()
        except (EOFError, OSError, BrokenPipeError):
            log.info("the worker process is gone: the engine process exits")
        except BaseException as e:
            log.exception("engine loop crashed")
            with contextlib.suppress(OSError):
                self.conn.send(("crash", repr(e)))
            raise SystemExit(1) from e
        finally:
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _commands(self, block: bool) -> bool:
        """Run what came down the pipe and what finished compiling; False: stop."""
        if self.conn.poll(_IDLE_WAIT_S if block else 0):
            while True:
                message = self.conn.recv()
                if message is None:
                    return False
                call_id, command = message
                self._accept(call_id, command)
                if not self.conn.poll(0):
                    break
        while True:
            try:
                call_id, command, error = self.compiled.get_nowait()
            except queue.Empty:
                return True
            if error is not None:
                self.conn.send(("reply", call_id, False, error))
            else:
                self._apply(call_id, command)

    def _accept(self, call_id: int, command: Command) -> None:
        name, args = command
        if name == "add_request":
            constraint = args[2].constraint
            if constraint is not None and not self.engine.grammars.cached(*constraint):
                job = self.pool.submit(self.engine.grammars.compile, *constraint)
                job.add_done_callback(
                    lambda f: self.compiled.put(
                        (call_id, command, None if f.cancelled() else f.exception())
                    )
                )
                return
        self._apply(call_id, command)

    def _apply(self, call_id: int, command: Command) -> None:
        name, args = command
        self.sync.ran(command)
        try:
            result = getattr(self.engine, name)(*args)
        except Exception as e:  # a typed error for the caller, not an engine failure
            self.conn.send(("reply", call_id, False, e))
            return
        if name in STARTS:
            if result is not None:
                self.conn.send(("out", [result]))
            result = None
        self.conn.send(("reply", call_id, True, result))
