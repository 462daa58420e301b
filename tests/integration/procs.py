"""Services as real subprocesses on free loopback ports, for integration tests.

    with start_service("services.tokenizer", ["--grace-period", "2"], name="tokenizer") as tok:
        channel = grpc.insecure_channel(tok.address)
        ...
    # on exit: SIGTERM, wait, and an AssertionError (with the log) unless it exited 0

``start_service`` returns once the process answers ``grpc.health.v1`` SERVING, so the caller can
use it at once; ``stop()`` sends SIGTERM and returns the exit code. Each process logs to a file
(a pipe nobody reads could fill up and block it); ``.log`` reads it back for failure messages.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0  # the first start may fetch and convert the default model
STOP_TIMEOUT_S = 30.0
# a small KV pool and context keep a worker's memory and startup small on 2-core CI machines
# --default-max-tokens 128: a request without max_tokens stops there, not at the context length
# (2-core CI; tests/integration/test_default_max_tokens.py checks the real default)
WORKER_ARGS = [
    *("--device", "cpu", "--num-pages", "256", "--max-model-len", "2048"),
    *("--default-max-tokens", "128"),
]


def worker_args(*extra: str) -> list[str]:
    """Flags for a test worker (``services.decode``): small pool, CPU, 5 s grace period."""
    return [*WORKER_ARGS, "--grace-period", "5", *extra]


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it; a race is possible but rare)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServiceProc:
    """One ``python -m <module>`` process listening on ``127.0.0.1:<port>``."""

    def __init__(
        self,
        module: str,
        args: list[str],
        name: str,
        port: int,
        log_dir: Path | None = None,
        tls: TLSConfig = PLAINTEXT,
    ) -> None:
        """``tls``: how this test dials it (a service started with ``--tls-*`` flags)."""
        self.module = module
        self.tls = tls
        self.name = name
        self.port = port
        self.address = f"127.0.0.1:{port}"
        log_dir = log_dir or Path(tempfile.mkdtemp(prefix=f"pdmesh-{name}-"))
        self.log_path = log_dir / f"{name}.log"
        self._log_file = self.log_path.open("w")
        self.argv = [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port)]
        self.argv += args
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        self.returncode: int | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def health(self, service: str = "") -> int:
        """The health status of ``service`` ("" = the whole server); raises grpc.RpcError."""
        with self.tls.sync_channel(self.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
        return int(reply.status)

    def wait_until_serving(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} while starting:\n{self.log}"
                )
            try:
                if self.health() == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"{self.name} not SERVING after {timeout:.0f}s:\n{self.log}")

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait, return the exit code (SIGKILL and -9 if it does not exit in time).
        Idempotent: a second call returns the first exit code."""
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._log_file.close()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.returncode = self.proc.wait()
        self._log_file.close()

    def stop_and_check(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop; assert a clean exit (code 0), showing the log otherwise."""
        code = self.stop(timeout)
        assert code == 0, f"{self.name} exited with {code} after SIGTERM:\n{self.log}"

    def __enter__(self) -> ServiceProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.stop_and_check()
        else:  # don't hide the test's own failure behind a shutdown assertion
            self.stop()

    def __repr__(self) -> str:
        return f"ServiceProc({self.name} {self.module} at {self.address}, pid {self.pid})"


def wait_all_serving(procs: list[ServiceProc]) -> None:
    """Wait for services started side by side (model loads overlap); if one fails, kill them
    all before raising."""
    try:
        for p in procs:
            p.wait_until_serving()
    except BaseException:
        for p in procs:
            p.kill()
        raise


def start_service(
    module: str,
    args: list[str],
    name: str,
    *,
    log_dir: Path | None = None,
    timeout: float = STARTUP_TIMEOUT_S,
    tls: TLSConfig = PLAINTEXT,
) -> ServiceProc:
    """Start ``python -m module --host 127.0.0.1 --port <free> *args`` and wait until its
    health check (dialed with ``tls``) answers SERVING. ``name`` labels its log file and
    failure messages."""
    svc = ServiceProc(module, args, name, free_port(), log_dir, tls)
    try:
        svc.wait_until_serving(timeout)
    except BaseException:
        svc.kill()
        raise
    return svc
