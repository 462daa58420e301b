"""Drive ``python -m services.launch`` from a test: start it, wait for "pdmesh is up", send a
chat completion through its gateway, and stop it with Ctrl-C, checking every service exited 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from tests.integration.procs import REPO_ROOT

STARTUP_S = 200.0


@contextmanager
def launched(args: list[str]) -> Iterator[subprocess.Popen[str]]:
    """The launcher with ``args``, once it says the mesh is up; killed if a test leaves it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.launch", *args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines: list[str] = []
        deadline = time.monotonic() + STARTUP_S
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "launcher exited:\n" + "".join(lines)
            lines.append(line)
            if "pdmesh is up" in line:
                break
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def chat(gateway_port: int, content: str, max_tokens: int = 16) -> str:
    """A greedy chat completion through the gateway; the assistant's text."""
    body = json.dumps(
        {
            "model": "smollm2-135m-instruct",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }
    ).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return str(json.load(resp)["choices"][0]["message"]["content"])


def stop_with_ctrl_c(proc: subprocess.Popen[str], services: tuple[str, ...]) -> None:
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for name in services:
        assert f"{name} stopped (exit 0)" in out, out
