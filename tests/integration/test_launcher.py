"""``make run``'s launcher: the whole mesh up, one real chat completion, Ctrl-C stops all."""

from __future__ import annotations

import pytest

from tests.integration.launcher_util import chat, launched, stop_with_ctrl_c
from tests.integration.procs import free_port

pytestmark = pytest.mark.model


def test_launcher_serves_and_stops_cleanly() -> None:
    ports = [free_port() for _ in range(4)]
    args = [
        "--gateway-port", str(ports[0]), "--router-port", str(ports[1]),
        "--tokenizer-port", str(ports[2]), "--worker-port", str(ports[3]),
        "--grace-period", "5", "--startup-timeout", "180",
        "--", "--num-pages", "128", "--max-model-len", "1024",
    ]  # fmt: skip
    with launched(args) as proc:
        assert "Paris" in chat(ports[0], "What is the capital of France?")
        stop_with_ctrl_c(proc, ("gateway", "router", "worker", "tokenizer"))
