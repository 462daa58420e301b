"""One fault under load, start to finish: hit a role with ``kill -9``, SIGTERM or SIGSTOP while
the load runs, wait for every request that was in flight to end, bring the role back (restart
it on its port, or SIGCONT), time how long until it serves and until the mesh uses it again,
then pause the load and check every worker holds no KV page.

    result = run_fault(mesh, load, "decode", "kill -9")
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from harness.chaos.load import OK, SteadyLoad
from harness.chaos.outcomes import in_flight_at, started_between, tally
from harness.chaos.report import FaultResult
from tests.chaos.mesh import GRACE_S, WORKER_ROLES, ChaosMesh, Member, wait_for

KILL, TERM, STOP = "kill -9", "SIGTERM", "SIGSTOP"
FAULTS = (KILL, TERM, STOP)
# the member each role's faults hit
TARGET = {
    "tokenizer": "tokenizer",
    "router": "router-1",
    "gateway": "gateway",
    "worker": "worker-a",
    "prefill": "prefill",
    "decode": "decode",
    "consul": "consul",
}
BUSY_WAIT_S = 20.0  # for the target worker to have a request to break
WARM_OK = 3  # completions before a fault (the load flows) and after recovery (it flows again)
STOP_HOLD_S = 6.0  # a stopped worker stays stopped at least this long: Consul and routers notice
RECOVERY_S = 120.0
PAGES_FREE_S = 10.0


def run_fault(mesh: ChaosMesh, load: SteadyLoad, role: str, fault: str) -> FaultResult:
    if fault not in FAULTS:
        raise ValueError(f"fault {fault!r}; choose {', '.join(FAULTS)}")
    slack = load.config.deadline_s + load.config.client_slack_s
    mesh.wait_ready()
    load.resume()
    assert load.wait_count(OK, WARM_OK, time.monotonic(), 60), "the load does not flow"
    target = TARGET[role]
    if role in WORKER_ROLES:
        # so the fault breaks requests mid-way (best effort: a prefill's turn is short)
        with contextlib.suppress(AssertionError):
            wait_for(f"{target} is busy", lambda: mesh.busy(mesh.member(target)), BUSY_WAIT_S)
    t_fault = time.monotonic()
    exit_code, drained_s = _hit(mesh, target, fault)
    hit = load.in_flight_at(t_fault)
    if fault == STOP:
        time.sleep(STOP_HOLD_S)
    assert load.wait_ended(hit, slack + 5), f"requests in flight at the {fault} never ended"
    serving_s = _bring_back(mesh, target, fault)
    in_use_s = _wait_in_use(mesh, target, RECOVERY_S)
    t_in_use = time.monotonic()
    # the mesh serves through the gateway again
    assert load.wait_count(OK, WARM_OK, t_in_use, 60), (
        f"no request completed after {role} came back"
    )
    load.pause()
    assert load.wait_drained(slack + 5), "requests still in flight after the load paused"
    leaked = mesh.pages_in_use(within=PAGES_FREE_S)
    outcomes = load.outcomes()
    deadline = load.config.deadline_s
    return FaultResult(
        role=role,
        fault=fault,
        in_flight=tally(in_flight_at(outcomes, t_fault), deadline),
        while_down=tally(started_between(outcomes, t_fault, t_in_use), deadline),
        exit_code=exit_code,
        drained_s=drained_s,
        restart_to_serving_s=serving_s,
        serving_to_in_use_s=in_use_s,
        leaked_pages=leaked,
    )


def _hit(mesh: ChaosMesh, target: str, fault: str) -> tuple[int | None, float | None]:
    """Apply ``fault``; for SIGTERM, wait for the exit: (exit code, seconds it took)."""
    if target == "consul":
        if fault == KILL:
            mesh.agent.kill()
        elif fault == TERM:
            mesh.agent.stop()  # SIGTERM: a graceful leave
        else:
            raise ValueError("the chaos runs do not stop the Consul agent")
        return None, None
    m = mesh.member(target)
    if fault == KILL:
        m.proc.kill()
        return None, None
    if fault == STOP:
        os.kill(m.proc.pid, signal.SIGSTOP)
        return None, None
    start = time.monotonic()
    m.proc.proc.send_signal(signal.SIGTERM)
    code = m.proc.proc.wait(timeout=GRACE_S + 30)  # the drain is bounded by --grace-period
    return code, time.monotonic() - start


def _bring_back(mesh: ChaosMesh, target: str, fault: str) -> float:
    """Restart (or SIGCONT) ``target``; seconds until it answers."""
    start = time.monotonic()
    if target == "consul":
        mesh.agent.start()
        return time.monotonic() - start
    m: Member = mesh.member(target)
    if fault == STOP:
        os.kill(m.proc.pid, signal.SIGCONT)
    else:
        mesh.restart(target)
    mesh.wait_serving(m)
    return time.monotonic() - start


def _wait_in_use(mesh: ChaosMesh, target: str, timeout: float) -> float:
    if target == "consul":
        # the agent restarted empty (dev mode): every service's keeper registers it again
        return wait_for("every service is back in Consul", mesh.all_passing, timeout)
    return mesh.wait_in_use(target, timeout)
