"""SGLang's gateway ``smg`` (PyPI ``smg``, a Rust binary) as a real subprocess for interop tests.

    with start_smg(["--worker-urls", "grpc://127.0.0.1:50053"], tokenizer_dir, log_dir) as smg:
        httpx.post(f"{smg.url}/v1/chat/completions", json=...)
    # on exit: SIGTERM, and an AssertionError (with the log) unless it exited 0

``start_smg`` returns once ``/readiness`` answers 200 and ``/workers`` lists every worker
healthy, so requests can be sent at once.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.integration.procs import REPO_ROOT, free_port

STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def smg_binary() -> str:
    """The ``smg`` console script of this interpreter's environment (dev extras)."""
    beside = Path(sys.executable).with_name("smg")
    found = str(beside) if beside.exists() else shutil.which("smg")
    if found is None:
        raise AssertionError("smg is not installed: pip install -e '.[dev]' (smg==1.13.0)")
    return found


class SmgProc:
    def __init__(self, args: list[str], tokenizer_dir: Path, log_dir: Path, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"{name}.log"
        self._log_file = self.log_path.open("w")
        self.argv = [
            smg_binary(), "launch", "--host", "127.0.0.1", "--port", str(self.port),
            # its Prometheus listener defaults to 0.0.0.0:29000: one per test process instead
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--tokenizer-path", str(tokenizer_dir), "--shutdown-grace-period-secs", "2",
            "--log-level", "info", *args,
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            self.argv, cwd=REPO_ROOT, stdout=self._log_file, stderr=subprocess.STDOUT
        )
        self.returncode: int | None = None

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[dict[str, Any]]:
        reply = httpx.get(f"{self.url}/workers", timeout=5)
        reply.raise_for_status()
        return list(reply.json()["workers"])

    def wait_until_ready(self, num_workers: int, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log}")
            try:
                ready = httpx.get(f"{self.url}/readiness", timeout=2).status_code == 200
                healthy = [w for w in self.workers() if w.get("is_healthy")]
                if ready and len(healthy) == num_workers:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log}")

    def stop(self) -> int:
        if self.returncode is not None:
            return self.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        self._log_file.close()
        return self.returncode

    def __enter__(self) -> SmgProc:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        code = self.stop()
        if exc_type is None:
            assert code == 0, f"{self.name} exited with {code} after SIGTERM:\n{self.log}"


def start_smg(
    args: list[str], tokenizer_dir: Path, log_dir: Path, num_workers: int, name: str = "smg"
) -> SmgProc:
    """``smg launch`` with ``args`` (worker URLs, mode), ready with ``num_workers`` healthy."""
    smg = SmgProc(args, tokenizer_dir, log_dir, name)
    try:
        smg.wait_until_ready(num_workers)
    except BaseException:
        smg.stop()
        raise
    return smg
