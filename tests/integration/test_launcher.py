"""``make run``'s launcher: the whole mesh up, one real chat completion, Ctrl-C stops all."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.procs import REPO_ROOT, free_port

pytestmark = pytest.mark.model


def test_launcher_serves_and_stops_cleanly(tmp_path: object) -> None:
    ports = [free_port() for _ in range(4)]
    argv = [
        sys.executable, "-m", "pdmesh.launcher",
        "--gateway-port", str(ports[0]), "--router-port", str(ports[1]),
        "--tokenizer-port", str(ports[2]), "--worker-port", str(ports[3]),
        "--grace-period", "5", "--startup-timeout", "180",
        "--", "--num-pages", "128", "--max-model-len", "1024",
    ]  # fmt: skip
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines = []
        deadline = time.monotonic() + 200
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "launcher exited:\n" + "".join(lines)
            lines.append(line)
            if "pdmesh is up" in line:
                break
        body = json.dumps(
            {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 16,
                "temperature": 0,
            }
        ).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{ports[0]}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.load(resp)
        assert "Paris" in reply["choices"][0]["message"]["content"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        for name in ("gateway", "router", "worker", "tokenizer"):
            assert f"{name} stopped (exit 0)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
