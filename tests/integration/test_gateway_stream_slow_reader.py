"""A client that stops reading its SSE stream gets, once it reads again, the rest in a few
merged chunks (every token once, in order), and a stream another client reads meanwhile on the
same router stream runs on unaffected. Real mesh: the session's tokenizer, worker and router,
the default model.

The HTTP side of a gateway only falls behind its router output once the connection's buffers
are full, and on loopback the kernel's send buffer grows to megabytes (more than a CPU can
generate in a test's time). So this gateway process listens on a socket with a small send
buffer, which its connections inherit: ``python -m`` this module runs the real gateway
(``services.gateway.serve``) on it, with the gateway's own flags.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.procs import ServiceProc, free_port
from tests.integration.test_gateway import GREETING, MODEL, sse_events, wait_until_idle

pytestmark = pytest.mark.model

SEND_BUFFER = 4096  # bytes; the kernel's minimum is about this (it doubles what it is given)
STARTUP_S = 60.0


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from pdmesh.models.fetch import ensure_default_model

    return AutoTokenizer.from_pretrained(ensure_default_model(progress=False))


@pytest.fixture(scope="module")
def small_buffer_gateway(
    router_proc: ServiceProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProc]:
    module = "tests.integration.test_gateway_stream_slow_reader"
    args = ["--router", router_proc.address, "--grace-period", "2"]
    log_dir = tmp_path_factory.mktemp("gw-small-buffer")
    svc = ServiceProc(module, args, "gateway", free_port(), log_dir)
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert svc.proc.poll() is None, svc.log
        try:
            if httpx.get(f"http://{svc.address}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, svc.log
        time.sleep(0.2)
    yield svc
    svc.stop_and_check()
    assert "opened a Stream call to router" in svc.log


def test_a_slow_reader_gets_merged_chunks_while_another_stream_runs_on(
    small_buffer_gateway: ServiceProc, worker_proc: ServiceProc, hf_tokenizer: Any
) -> None:
    chat = f"http://{small_buffer_gateway.address}/v1/chat/completions"
    # logprobs with 20 alternatives make a chunk ~2.5 KB: the buffers (uvicorn's 64 KB and the
    # small socket's) are full after a few dozen tokens of a reader that stopped
    tokens = 100
    slow_body = {
        "model": MODEL,
        "messages": GREETING,
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 20,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    small_window = httpx.HTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, SEND_BUFFER)]
    )
    with (
        httpx.Client(transport=small_window, timeout=300) as slow_client,
        slow_client.stream("POST", chat, json=slow_body) as slow,
    ):
        assert slow.status_code == 200
        body = slow.iter_raw()
        received = next(body)  # the role chunk (and maybe more), then stop reading
        # meanwhile, another request on the same router stream, read as it comes
        fast_body = {**slow_body, "max_tokens": 12, "logprobs": False, "top_logprobs": None}
        with httpx.stream("POST", chat, json=fast_body, timeout=120) as fast:
            fast_events = sse_events(fast)
        fast_chunks = [e for e in fast_events if e["choices"] and e["choices"][0]["delta"]]
        assert fast_events[-1]["usage"]["completion_tokens"] == 12
        assert len(fast_chunks) >= 1 + 12 // 2  # the role, then about one chunk per token
        # the slow request runs to its end at the worker although nobody reads it
        wait_until_idle(worker_proc, since=time.monotonic(), limit_s=300)
        for part in body:
            received += part
    assert received.endswith(b"data: [DONE]\n\n")
    lines = received.decode().split("\n")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    content = [e for e in events if e["choices"] and e["choices"][0]["logprobs"]]
    entries = [lp for e in content for lp in e["choices"][0]["logprobs"]["content"]]
    assert events[-1]["usage"]["completion_tokens"] == tokens == len(entries)
    chunks = f"{len(content)} chunks for {tokens} tokens"
    assert len(content) < tokens - 20, f"a reader that stopped got a chunk per token: {chunks}"
    assert max(len(e["choices"][0]["logprobs"]["content"]) for e in content) > 10
    # every token once, in order (logprobs name them token_id:<id> without --tokenizer), and
    # the merged chunks' text is those tokens' text
    ids = [int(lp["token"].removeprefix("token_id:")) for lp in entries]
    text = "".join(e["choices"][0]["delta"]["content"] for e in content)
    assert text == hf_tokenizer.decode(ids, skip_special_tokens=True)


def main(argv: list[str]) -> int:
    """The gateway with its own flags, on a listening socket with a small send buffer."""
    from pdmesh.config import from_args
    from pdmesh.rpc.server import configure_logging
    from services.gateway import serve
    from services.gateway.__main__ import build_parser
    from services.gateway.config import GatewayConfig
    from services.gateway.workers import bind
    from services.mesh import MeshOptions

    args = build_parser().parse_args(argv)
    config = from_args(GatewayConfig, args)
    configure_logging(config.log_level)
    sock = bind(config.host, config.port)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)  # accepted ones inherit it
    return serve.run(config, MeshOptions.from_args(args), sockets=[sock])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
