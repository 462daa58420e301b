"""The ranks of a tensor-parallel engine: N engine processes, one per device, each holding its
shard of the model (``TPShard``) and its KV heads.

NOTE: how the ranks stay in step. Rank 0 is the engine process the worker talks to
(``engine_process``); it runs every command that comes down its pipe. Once per loop it
broadcasts to the other ranks the commands it ran since the last broadcast and whether it steps
now (``StepSync``), and each rank runs the same calls in the same order, then the same step.
Every rank's scheduler then makes the same decisions and each step's collectives match, as
SGLang's TP schedulers do (rank 0 receives the requests and broadcasts them). The sizes that
could differ between ranks are agreed first: the KV pool is the least of the ranks' pools.

The broadcast goes out also when rank 0 is idle (every ``_IDLE_WAIT_S``), so a rank that hears
nothing for the group's timeout knows rank 0 is gone and exits. A rank that dies is seen by the
worker process at once (``EngineProcess`` watches every rank's process) and the worker stops as
one unit.
"""

from __future__ import annotations

import logging
import multiprocessing.connection
import os
from dataclasses import dataclass
from typing import Any

from pdmesh.distributed import TPGroup
from pdmesh.engine.config import EngineConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TPLaunch:
    """What one rank's process needs to join the others."""

    rank: int
    size: int
    init_method: str  # tcp://127.0.0.1:<port>, chosen by the worker process

    def join(self, config: EngineConfig) -> TPGroup:
        return TPGroup.join(
            self.rank,
            self.size,
            self.init_method,
            config.for_rank(self.rank).torch_device(),
            config.tp_timeout,
        )


Command = tuple[str, tuple[Any, ...]]


class StepSync:
    """Rank 0's side: the commands it ran, sent to the other ranks with each step decision."""

    def __init__(self, tp: TPGroup) -> None:
        self.tp = tp
        self._ran: list[Command] = []

    def ran(self, command: Command) -> None:
        if self.tp.size > 1:
            self._ran.append(command)

    def step(self, will_step: bool) -> None:
        """Before rank 0's step (or idle turn): the others run what it ran, then step too."""
        if self.tp.size > 1:
            ran, self._ran = self._ran, []
            self.tp.broadcast_object((ran, will_step))

    def stop(self) -> None:
        if self.tp.size > 1:
            self.tp.broadcast_object(None)


def follower_main(
    config: EngineConfig, launch: TPLaunch, conn: multiprocessing.connection.Connection
) -> None:
    """A rank above 0: build its engine, say ready on ``conn``, then follow rank 0."""
    from pdmesh.engine.llm_engine import LLMEngine
    from pdmesh.rpc.server import configure_logging

    configure_logging(os.environ.get("PDMESH_ENGINE_LOG_LEVEL", "info"))
    try:
        tp = launch.join(config)
        engine = LLMEngine(config.for_rank(launch.rank), None, tp)
    except BaseException as e:  # noqa: BLE001 (the worker process reports it and exits)
        conn.send(("error", f"tp rank {launch.rank}: {e}"))
        return
    conn.send(("ready", None))
    conn.close()
    try:
        _follow(engine, tp)
    except Exception as e:
        # a collective timed out or failed: rank 0 or another rank is gone
        log.error("tp rank %d stops: %s", launch.rank, e)
        raise SystemExit(1) from e
    finally:
        tp.close()


def _follow(engine: Any, tp: TPGroup) -> None:
    while True:
        message = tp.broadcast_object(None)
        if message is None:
            log.info("tp rank %d: rank 0 stopped", tp.rank)
            return
        commands: list[Command]
        will_step: bool
        commands, will_step = message  # type: ignore[misc]
        for name, args in commands:
            try:
                getattr(engine, name)(*args)
            except Exception:  # noqa: S112 (rank 0 raised the same and answered the caller)
                continue
        if will_step:
            engine.step()
