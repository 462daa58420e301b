"""``Fleet``: the processes a service benchmark starts (workers, routers, gateway), each
logging to its own file, stopped in reverse order however the benchmark ends.

    with Fleet(log_dir, startup_timeout=60) as fleet:
        w = fleet.start("echo-0", ["-m", "benchmarks.routers.echo_worker", ...], f"grpc://{addr}")
        fleet.wait_healthy()
        ...
    # on exit: SIGTERM to each (last started first), SIGKILL after a grace period

A child that dies while starting or while the benchmark runs is reported with the tail of its
log, so a failed run says why.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from services.launch import is_healthy

log = logging.getLogger(__name__)

STOP_GRACE_S = 10.0
LOG_TAIL_CHARS = 3000


def free_port() -> int:
    """A loopback port nothing listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc (Linux); nan elsewhere or once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return float("nan")
    # the command name (field 2) may hold spaces: count fields after its closing parenthesis
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ChildDied(RuntimeError):
    """A benchmark process exited (or never became healthy)."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    health: str  # "grpc://host:port" (grpc.health.v1) or "http://host:port/health"
    log_path: Path

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        """User + system CPU time the process has used so far; nan where /proc is missing."""
        return process_cpu_seconds(self.proc.pid)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ChildDied(
                f"{self.name} exited with {self.proc.returncode}; the end of its log "
                f"({self.log_path}):\n{self.log_tail()}"
            )


class Fleet:
    def __init__(self, log_dir: Path | None = None, startup_timeout: float = 120.0) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="pdmesh-bench-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.startup_timeout = startup_timeout
        self.children: list[Child] = []

    def start(self, name: str, args: list[str], health: str) -> Child:
        """``python *args`` (e.g. ["-m", "services.router", ...]) with its output in
        ``<log_dir>/<name>.log``; returns at once (see ``wait_healthy``)."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as out:
            # own session: a Ctrl-C in the terminal reaches the benchmark only, which then
            # stops its children in order
            proc = subprocess.Popen(
                [sys.executable, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, proc, health, log_path)
        self.children.append(child)
        log.info("started %s (pid %d): python %s", name, proc.pid, " ".join(args))
        return child

    def wait_healthy(self, children: list[Child] | None = None) -> None:
        """Until every child (default: all) answers its health check; raises ``ChildDied``
        when one exits first or the startup timeout passes."""
        pending = list(self.children if children is None else children)
        deadline = time.monotonic() + self.startup_timeout
        while pending:
            for child in list(pending):
                child.check_alive()
                if is_healthy(child.health):
                    pending.remove(child)
            if not pending:
                return
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                tails = "\n".join(f"--- {c.name}:\n{c.log_tail()}" for c in pending)
                raise ChildDied(f"not healthy within {self.startup_timeout:.0f}s: {names}\n{tails}")
            time.sleep(0.2)

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()

    def stop_children(self, children: list[Child]) -> None:
        """Stop these (last started first) and forget them; the rest keep running."""
        for child in reversed(children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for child in reversed(children):
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0fs; killing it", child.name, STOP_GRACE_S)
                child.proc.kill()
                child.proc.wait()
            self.children.remove(child)

    def stop(self) -> None:
        self.stop_children(list(self.children))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
