"""Soak (``make soak``; skipped unless PDMESH_SOAK_SECONDS is set): the chaos mesh under steady
load of mixed lengths for minutes, the client cancelling 20% of its requests part-way, and a
random worker killed (``kill -9``) and restarted every PDMESH_SOAK_FAULT_EVERY seconds.

At checkpoints (the load paused until nothing is in flight) it samples the RSS, open file
descriptors and threads of every process, and the KV pages, requests and rooms each worker
still holds; between checkpoints it samples the processes under load too. At the end it prints
every series with a verdict — flat, or growing — and accounts for every request: completed,
cancelled by the client, or failed with the reason it gave. It fails on a growing series, a
page held at a checkpoint, a request past its deadline, or one without an outcome or reason.
"""

from __future__ import annotations

import os
import random
import time
from collections import defaultdict
from pathlib import Path

import pytest

from harness.chaos.load import LoadConfig, SteadyLoad, mixed_requests
from harness.chaos.outcomes import tally
from harness.chaos.procstats import TOLERANCES, sample, trend
from harness.chaos.report import MIB, SeriesReport, series_table
from tests.chaos.mesh import WORKER_ROLES, ChaosMesh

pytestmark = [pytest.mark.chaos, pytest.mark.model]

SECONDS = float(os.environ.get("PDMESH_SOAK_SECONDS", "0"))
FAULT_EVERY_S = float(os.environ.get("PDMESH_SOAK_FAULT_EVERY", "40"))
CHECKPOINT_EVERY_S = 20.0
SAMPLE_EVERY_S = 2.0
WARMUP_S = 20.0  # load before the first checkpoint: caches, pools and JIT-ish warmup settle
DEADLINE_S = 30.0
CANCEL_FRACTION = 0.2
MIN_SAMPLES = 6  # a process instance with fewer (a worker restarted late) is not judged


@pytest.mark.skipif(SECONDS <= 0, reason="soak runs with make soak (PDMESH_SOAK_SECONDS)")
def test_soak(tmp_path: Path) -> None:
    mesh = ChaosMesh(tmp_path, pd=True, deadline_s=DEADLINE_S).start()
    config = LoadConfig(
        f"http://{mesh.member('gateway').address}",
        concurrency=6,
        deadline_s=DEADLINE_S,
        cancel_fraction=CANCEL_FRACTION,
        seed=11,
    )
    # prompts of 8-96 tokens, outputs of 4-48: a mix of short chats and longer PD prompts
    load = SteadyLoad(config, mixed_requests(256, 96, 48, seed=11, spread=0.92))
    rng = random.Random(11)
    # (process instance, metric) -> values; an instance is "<name>#<start number>"
    series: dict[tuple[str, str], list[float]] = defaultdict(list)
    kills: list[str] = []
    try:
        load.start()
        time.sleep(WARMUP_S)
        start = time.monotonic()
        next_fault = start + FAULT_EVERY_S * rng.uniform(0.3, 1.0)
        next_checkpoint = start
        while time.monotonic() - start < SECONDS:
            now = time.monotonic()
            if now >= next_checkpoint:
                checkpoint(mesh, load, series)
                next_checkpoint = time.monotonic() + CHECKPOINT_EVERY_S
            elif now >= next_fault:
                kills.append(kill_and_restart(mesh, rng))
                next_fault = time.monotonic() + FAULT_EVERY_S
            else:
                sample_processes(mesh, series, "load")
                time.sleep(SAMPLE_EVERY_S)
        checkpoint(mesh, load, series)
        load.stop()
    finally:
        load.stop()
        unclean = mesh.stop()
    assert not unclean, "\n".join(unclean)

    outcomes = load.outcomes()
    t = tally(outcomes, DEADLINE_S)
    reports = judge(series)
    print(f"\nsoak: {SECONDS:.0f} s, {len(kills)} workers killed and restarted: {', '.join(kills)}")
    print(
        f"requests: {t.total} sent = {t.completed} completed + {t.cancelled} cancelled by the "
        f"client + {t.failed} failed + {t.unfinished} without an outcome; "
        f"{t.past_deadline} past the {DEADLINE_S:.0f} s deadline"
    )
    for reason, n in t.reasons.most_common():
        print(f"  failed {n}x: {reason}")
    print(series_table(reports))
    growing = [f"{r.process} {r.metric}" for r in reports if r.growing]
    print("verdict:", "FLAT" if not growing else "GROWING: " + ", ".join(growing))

    assert t.total == t.completed + t.cancelled + t.failed, "a request has no outcome"
    assert t.unclear == 0, t.reasons
    assert t.past_deadline == 0
    assert t.cancelled >= 0.5 * CANCEL_FRACTION * t.total, "the client cancelled too few"
    assert not growing, growing


def checkpoint(
    mesh: ChaosMesh, load: SteadyLoad, series: dict[tuple[str, str], list[float]]
) -> None:
    """Pause the load until nothing is in flight, sample everything idle, resume."""
    load.pause()
    assert load.wait_drained(DEADLINE_S + 15), "requests still in flight after pausing"
    held = mesh.pages_in_use(within=10)
    for name, n in held.items():
        series[(instance(mesh, name), "kv held (idle)")].append(n)
    assert not any(held.values()), f"KV pages, requests or rooms held while idle: {held}"
    sample_processes(mesh, series, "idle")
    load.resume()


def sample_processes(
    mesh: ChaosMesh, series: dict[tuple[str, str], list[float]], when: str
) -> None:
    for name, pid in mesh.pids():
        s = sample(pid)
        if s is None:
            continue
        key = instance(mesh, name)
        series[(key, f"rss MiB ({when})")].append(s.rss_bytes / MIB)
        # sockets a dead peer left behind are counted apart (see judge)
        series[(key, f"fds ({when})")].append(s.fds - s.close_wait)
        series[(key, f"close-wait ({when})")].append(s.close_wait)
        series[(key, f"threads ({when})")].append(s.threads)


def instance(mesh: ChaosMesh, name: str) -> str:
    return name if name == "consul" else f"{name}#{mesh.member(name).starts}"


def kill_and_restart(mesh: ChaosMesh, rng: random.Random) -> str:
    """``kill -9`` a random worker under load, restart it, wait until every router uses it."""
    victim = rng.choice(mesh.of_role(*WORKER_ROLES))
    victim.proc.kill()
    mesh.restart(victim.name)
    mesh.wait_serving(victim)
    mesh.wait_in_use(victim.name, timeout=60)
    return victim.name


def judge(series: dict[tuple[str, str], list[float]]) -> list[SeriesReport]:
    """A trend per series with enough samples. Flatness is judged on the idle samples (like
    compared with like); the series under load are printed for the record, and so are the
    CLOSE_WAIT sockets: Mooncake's tcp transport keeps 4 per departed decode on a prefill
    (its Python binding has no call to close a peer's segment), which grows with every decode
    restart — an upstream leak that docs/chaos.md describes, not one of pdmesh's own."""
    reports = []
    for (process, metric), values in sorted(series.items()):
        kv = metric.startswith("kv")
        if len(values) < (3 if kv else MIN_SAMPLES):
            continue
        got = trend(values, TOLERANCES[metric.split(" (")[0]])
        judged = "(idle)" in metric and not metric.startswith("close-wait")
        reports.append(SeriesReport(process, metric, values, got, judged))
    return reports
