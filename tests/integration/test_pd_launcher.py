"""``make run-disagg``'s launcher (``python -m services.launch --mode disagg``): tokenizer,
prefill, decode, router and gateway up; a chat completion through the gateway is served
disaggregated (the prefill opened a room for it); Ctrl-C stops all five with exit 0."""

from __future__ import annotations

import grpc
import pytest

from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.launcher_util import chat, launched, stop_with_ctrl_c
from tests.integration.procs import free_port

pytestmark = pytest.mark.model


def test_disagg_launcher_serves_through_prefill_and_decode_and_stops_cleanly() -> None:
    gateway, router, tokenizer, decode, prefill, bootstrap = (free_port() for _ in range(6))
    argv = [
        "--mode", "disagg",
        "--gateway-port", str(gateway), "--router-port", str(router),
        "--tokenizer-port", str(tokenizer), "--worker-port", str(decode),
        "--prefill-port", str(prefill), "--bootstrap-port", str(bootstrap),
        "--kv-transfer-backend", "mooncake", "--grace-period", "5", "--startup-timeout", "180",
        "--", "--num-pages", "128", "--max-model-len", "1024",
    ]  # fmt: skip
    with launched(argv) as proc:
        assert "Paris" in chat(gateway, "What is the capital of France?")
        with grpc.insecure_channel(f"127.0.0.1:{prefill}") as channel:
            stub = worker_pb2_grpc.WorkerServiceStub(channel)
            info = stub.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=10)
            assert (info.role, info.bootstrap_port) == ("prefill", bootstrap)
            assert stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=10).total_rooms == 1
        stop_with_ctrl_c(proc, ("gateway", "router", "decode", "prefill", "tokenizer"))
