"""Host faults under load in the multi-host bed, start to finish, and the table they print.

    result = run_host_fault(bed, load, "b", LINK_DOWN)   # B's links down mid-stream, then up
    print(host_fault_table([result]))

Faults: ``LINK_DOWN`` (the host's switch ports down: a network partition, its processes keep
running), ``KILL_HOST`` (every process of the host, Consul agent included, SIGKILLed at once,
then started again as after a reboot) and ``CONSUL_PARTITION`` (only the host's gossip link
down: its Consul agent is cut off from the cluster while its services keep serving on the
service network).

For each: the requests in flight when it hit must end (output or a clear error) before their
deadline; the time until no router on another host routes to the host's workers, and from the
repair until every router routes to them again, are measured; then the load pauses and every
worker must hold no KV page, request or room.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

from harness.chaos.load import OK, SteadyLoad
from harness.chaos.outcomes import Tally, in_flight_at, started_between, tally
from harness.testbed.bed import WORKER_ROLES, MultiHostBed, wait_until

LINK_DOWN, KILL_HOST, CONSUL_PARTITION = "link down", "kill host", "consul partition"
FAULTS = (LINK_DOWN, KILL_HOST, CONSUL_PARTITION)
HOLD_S = 8.0  # a fault lasts this long at least: health checks and gossip notice
OUT_OF_ROUTING_TIMEOUT_S = 60.0
BACK_TIMEOUT_S = 120.0
WARM_OK = 3
PAGES_FREE_S = 30.0


@dataclass
class HostFaultResult:
    host: str
    fault: str
    in_flight: Tally  # the requests in flight when the fault hit
    while_down: Tally  # sent after the fault until the host was back in use
    out_of_routing_s: float | None  # fault -> no router elsewhere routes to the host's workers
    back_in_use_s: float | None  # repair -> every router routes to them again
    leaked_pages: dict[str, int] = field(default_factory=dict)


def _routers_elsewhere(bed: MultiHostBed, host: str) -> list[str]:
    return [r.name for r in bed.of_role("router") if r.host != host]


def _workers_on(bed: MultiHostBed, host: str) -> list[str]:
    return [w.name for w in bed.of_role(*WORKER_ROLES) if w.host == host]


def routed_to(bed: MultiHostBed, host: str) -> bool:
    """Whether any router on another host lists a worker of ``host`` healthy."""
    return any(
        bed.routes_to(r, w) for r in _routers_elsewhere(bed, host) for w in _workers_on(bed, host)
    )


def fully_in_use(bed: MultiHostBed, host: str) -> bool:
    """Whether every router (all alive again) lists every worker of ``host`` healthy."""
    routers = [r.name for r in bed.of_role("router")]
    return all(bed.routes_to(r, w) for r in routers for w in _workers_on(bed, host))


def _busy(bed: MultiHostBed, host: str) -> bool:
    for w in _workers_on(bed, host):
        with contextlib.suppress(Exception):
            load = bed.load_of(w)
            if load.num_running > 0 or load.num_rooms > 0:  # type: ignore[attr-defined]
                return True
    return False


def run_host_fault(
    bed: MultiHostBed, load: SteadyLoad, host: str, fault: str, hold_s: float = HOLD_S
) -> HostFaultResult:
    if fault not in FAULTS:
        raise ValueError(f"fault {fault!r}; choose {', '.join(FAULTS)}")
    slack = load.config.deadline_s + load.config.client_slack_s
    bed.wait_ready()
    load.resume()
    assert load.wait_count(OK, WARM_OK, time.monotonic(), 60), "the load does not flow"
    with contextlib.suppress(AssertionError):  # so the fault breaks requests mid-way
        wait_until(f"a worker on {host} is busy", lambda: _busy(bed, host), 20)
    t_fault = time.monotonic()
    if fault == LINK_DOWN:
        bed.partition(host)
    elif fault == KILL_HOST:
        bed.kill_host(host)
    else:
        bed.partition(host, nets=("gossip",))
    hit = load.in_flight_at(t_fault)
    out_s: float | None
    try:
        out_s = wait_until(
            f"no router elsewhere routes to {host}",
            lambda: not routed_to(bed, host),
            OUT_OF_ROUTING_TIMEOUT_S,
        )
    except AssertionError:
        out_s = None
    time.sleep(max(0.0, t_fault + hold_s - time.monotonic()))
    assert load.wait_ended(hit, slack + 5), f"requests in flight at the {fault} never ended"
    if fault == KILL_HOST:
        bed.restart_host(host)
        for s in bed.services.values():
            if s.host == host:
                bed.wait_serving(s.name)
    else:
        bed.heal(host)
    back_s: float | None
    try:
        back_s = wait_until(
            f"every router routes to {host} again", lambda: fully_in_use(bed, host), BACK_TIMEOUT_S
        )
    except AssertionError:
        back_s = None
    t_back = time.monotonic()
    bed.wait_members(timeout=BACK_TIMEOUT_S)
    assert load.wait_count(OK, WARM_OK, t_back, 60), f"no request completed after {host} came back"
    load.pause()
    assert load.wait_drained(slack + 5), "requests still in flight after the load paused"
    leaked = bed.pages_held(within=PAGES_FREE_S)
    outcomes = load.outcomes()
    deadline = load.config.deadline_s
    return HostFaultResult(
        host=host,
        fault=fault,
        in_flight=tally(in_flight_at(outcomes, t_fault), deadline),
        while_down=tally(started_between(outcomes, t_fault, t_back), deadline),
        out_of_routing_s=out_s,
        back_in_use_s=back_s,
        leaked_pages=leaked,
    )


HEADER = (
    "| host | fault | in flight | completed | failed (reason) | past deadline | "
    "out of routing | back in use | sent meanwhile: ok / failed | leaked pages |"
)


def _s(value: float | None) -> str:
    return "never" if value is None else f"{value:.1f} s"


def host_fault_table(results: list[HostFaultResult]) -> str:
    rows = [HEADER, "|" + " --- |" * (HEADER.count(" | ") + 1)]
    for r in results:
        t, d = r.in_flight, r.while_down
        failed = str(t.failed) + (f" ({t.describe_reasons(2)})" if t.failed else "")
        down = f"{d.completed} / {d.failed}" + (f" ({d.describe_reasons(1)})" if d.failed else "")
        leaked = ", ".join(f"{w}: {n}" for w, n in r.leaked_pages.items() if n) or "0"
        rows.append(
            f"| {r.host} | {r.fault} | {t.total} | {t.completed} | {_cell(failed)} | "
            f"{t.past_deadline} | {_s(r.out_of_routing_s)} | {_s(r.back_in_use_s)} | "
            f"{_cell(down)} | {leaked} |"
        )
    return "\n".join(rows)


def _cell(text: str) -> str:
    return text.replace("|", "/").replace("\n", " ")
