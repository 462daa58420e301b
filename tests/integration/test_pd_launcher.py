"""``make run-disagg``'s launcher (``python -m pdmesh.launcher --mode disagg``): tokenizer,
prefill, decode, router and gateway up; a chat completion through the gateway is served
disaggregated (the prefill opened a room for it); Ctrl-C stops all five with exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.procs import REPO_ROOT, free_port

pytestmark = pytest.mark.model


def test_disagg_launcher_serves_through_prefill_and_decode_and_stops_cleanly() -> None:
    gateway, router, tokenizer, decode, prefill, bootstrap = (free_port() for _ in range(6))
    argv = [
        sys.executable, "-m", "pdmesh.launcher", "--mode", "disagg",
        "--gateway-port", str(gateway), "--router-port", str(router),
        "--tokenizer-port", str(tokenizer), "--worker-port", str(decode),
        "--prefill-port", str(prefill), "--bootstrap-port", str(bootstrap),
        "--kv-transfer-backend", "mooncake", "--grace-period", "5", "--startup-timeout", "180",
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
            f"http://127.0.0.1:{gateway}/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            reply = json.load(resp)
        assert "Paris" in reply["choices"][0]["message"]["content"]
        with grpc.insecure_channel(f"127.0.0.1:{prefill}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            info = stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=10)
            assert (info.role, info.bootstrap_port) == ("prefill", bootstrap)
            assert stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10).total_rooms == 1
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        for name in ("gateway", "router", "decode", "prefill", "tokenizer"):
            assert f"{name} stopped (exit 0)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
