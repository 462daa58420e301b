"""``run_ranks``: one function on N local processes joined as a TP group, its results back.

For what runs the same code on every rank from start to end (benchmarks, tests), where no rank
needs to be told what to do next; the worker's engine ranks are ``pdmesh.engine.tp_ranks``.
Results travel by pickle through a queue: return plain values (lists, numpy arrays), not
tensors, whose shared memory goes away with the process.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import traceback
from collections.abc import Callable
from typing import Any

import torch

from pdmesh.distributed.group import DEFAULT_TIMEOUT_S, TPGroup

RankFn = Callable[[TPGroup, Any], Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(
    size: int,
    fn: RankFn,
    arg: Any,
    device: Callable[[int], torch.device] = lambda rank: torch.device("cpu"),
    timeout_s: float = 600.0,
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Any]:
    """``fn(tp, arg)`` on ranks ``0..size-1`` (``fn`` importable by name: the processes are
    spawned); each rank's result in rank order. Raises ``RuntimeError`` with the traceback of a
    rank that failed, or if the ranks take longer than ``timeout_s``."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, arg, rank, size, init, device(rank), collective_timeout_s, results),
            name=f"pdmesh-rank{rank}",
        )
        for rank in range(size)
    ]
    for p in procs:
        p.start()
    got: dict[int, tuple[bool, Any]] = {}
    try:
        for _ in procs:
            rank, ok, value = results.get(timeout=timeout_s)
            got[rank] = (ok, value)
            if not ok:
                break
    except Exception as e:  # queue.Empty: a rank hung or died without a word
        raise RuntimeError(f"the {size} ranks did not finish within {timeout_s:.0f}s") from e
    finally:
        for p in procs:
            p.join(timeout=10 if len(got) == size else 0)
            if p.is_alive():
                p.kill()
    for rank, (ok, value) in sorted(got.items()):
        if not ok:
            raise RuntimeError(f"rank {rank} of {size} failed:\n{value}")
    return [got[r][1] for r in range(size)]


def _rank_main(
    fn: RankFn,
    arg: Any,
    rank: int,
    size: int,
    init: str,
    device: torch.device,
    timeout_s: float,
    results: Any,
) -> None:
    try:
        tp = TPGroup.join(rank, size, init, device, timeout_s)
        try:
            results.put((rank, True, fn(tp, arg)))
        finally:
            tp.close()
    except BaseException:  # noqa: BLE001 (the caller raises it with this traceback)
        results.put((rank, False, traceback.format_exc()))
