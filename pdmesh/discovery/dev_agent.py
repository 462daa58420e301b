"""A throwaway ``consul agent -dev`` on free loopback ports, for tests and local runs.

    with ConsulDevAgent() as agent:          # returns once the agent has a leader
        ... --discovery consul --consul-addr agent.http_addr ...
        agent.kill(); agent.start()          # an outage, then the same agent address again

State lives in memory only (dev mode): a restarted agent starts empty, and the services' keepers
register again. DNS and the gRPC (xDS) port are off.

    python -m pdmesh.discovery.dev_agent     # prints CONSUL_HTTP_ADDR=..., runs until Ctrl-C
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

INSTALL_HINT = "install it with scripts/install_consul.sh (Debian's consul from bullseye)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ConsulDevAgent:
    def __init__(
        self,
        binary: str = "consul",
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """``extra_args``: more agent flags, e.g. ``["-hcl", "acl { enabled = true … }"]``."""
        found = shutil.which(binary)
        if found is None:
            raise FileNotFoundError(f"no {binary!r} on PATH; {INSTALL_HINT}")
        self.binary = found
        self.host = host
        self.ports = {name: free_port(host) for name in ("http", "server", "serf-lan", "serf-wan")}
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="pdmesh-consul-")) / "consul.log"
        self.extra_args = tuple(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_addr(self) -> str:
        """``host:port`` of the HTTP API (what ``--consul-addr`` / CONSUL_HTTP_ADDR take)."""
        return f"{self.host}:{self.ports['http']}"

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def argv(self) -> list[str]:
        return [
            self.binary, "agent", "-dev",
            "-bind", self.host, "-client", self.host,
            "-http-port", str(self.ports["http"]),
            "-server-port", str(self.ports["server"]),
            "-serf-lan-port", str(self.ports["serf-lan"]),
            "-serf-wan-port", str(self.ports["serf-wan"]),
            "-dns-port", "-1", "-grpc-port", "-1",
            "-log-level", "info",
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 30.0) -> ConsulDevAgent:
        """Start (again, on the same ports) and wait until it has elected itself leader."""
        if self.running:
            return self
        with self.log_path.open("ab") as log_file:
            # in its log's directory: a dev agent reads service definitions from ./services,
            # which from the repository root is pdmesh's Python package (an error per file)
            self.proc = subprocess.Popen(
                self.argv(),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.log_path.parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"consul exited with {self.proc.returncode}:\n{self.log}")
            if self._leader():
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"consul has no leader after {timeout:.0f}s:\n{self.log}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (a graceful leave), SIGKILL if it lingers."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: the agent vanishes mid-request, as in a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.proc = None

    def get(self, path: str, token: str = "") -> object:
        """GET ``path`` of the HTTP API, decoded JSON (for checks from the outside); ``token``:
        an ACL token, for an agent started with ACLs on."""
        headers = {"X-Consul-Token": token} if token else {}
        request = urllib.request.Request(self.url + path, headers=headers)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read() or b"null")

    def _leader(self) -> bool:
        try:
            return bool(self.get("/v1/status/leader"))
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def __enter__(self) -> ConsulDevAgent:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main() -> int:
    with ConsulDevAgent() as agent:
        print(f"CONSUL_HTTP_ADDR={agent.http_addr}  (log: {agent.log_path}); Ctrl-C stops it")
        sys.stdout.flush()
        stop = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # so sigwait, not a handler, gets them
        signal.sigwait(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
