"""``kill -9`` of the tokenizer while 16 requests stream: the router detokenizes in-process, so
all 16 complete with their whole text; new text requests then fail with a clear UNAVAILABLE
(HTTP 503 at the gateway) naming the tokenizer, until a tokenizer is back on its address."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import grpc.aio
import httpx
import pytest

from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc
from tests.integration.procs import ServiceProc, start_service, worker_args
from tests.integration.test_gateway import start_gateway

pytestmark = pytest.mark.model

NUM_STREAMS = 16
NEW_TOKENS = 48


def request(max_new_tokens: int = NEW_TOKENS) -> router_pb2.RouterGenerateRequest:
    return router_pb2.RouterGenerateRequest(
        text="Tell me a story about a lighthouse.",
        sampling_params=common_pb2.SamplingParams(
            temperature=0, max_new_tokens=max_new_tokens, ignore_eos=True
        ),
    )


async def stream_while_killing(router: str, tokenizer: ServiceProc) -> list[tuple[str, int]]:
    """Start NUM_STREAMS generations, kill the tokenizer once each has its first text, then
    read them to the end: (text, completion tokens) of each."""
    async with grpc.aio.insecure_channel(router) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        calls = [stub.Generate(request(), timeout=300) for _ in range(NUM_STREAMS)]
        firsts = [await call.read() for call in calls]
        tokenizer.kill()  # SIGKILL: no drain, no goodbye
        results = []
        for first, call in zip(firsts, calls):
            replies = [first]
            while (reply := await call.read()) is not grpc.aio.EOF:
                replies.append(reply)
            text = "".join(r.text for r in replies)
            results.append((text, replies[-1].usage.completion_tokens))
        return results


def test_a_killed_tokenizer_fails_no_stream_in_flight(tmp_path: Path) -> None:
    # killed by the test: not a context manager, which would assert a clean exit
    tokenizer = start_service("services.tokenizer", [], "tokenizer", log_dir=tmp_path)
    try:
        run_the_fault(tokenizer, tmp_path)
    finally:
        tokenizer.stop()


def run_the_fault(tokenizer: ServiceProc, tmp_path: Path) -> None:
    with (
        start_service("services.decode", worker_args(), "worker", log_dir=tmp_path) as worker,
        start_service(
            "services.router",
            ["--workers", worker.address, "--tokenizer", tokenizer.address, "--grace-period", "2"],
            "router",
            log_dir=tmp_path,
        ) as router,
    ):
        # the reference: the same request before the fault
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            expected = "".join(r.text for r in stub.Generate(request(), timeout=300))
        results = asyncio.run(stream_while_killing(router.address, tokenizer))
        assert [n for _, n in results] == [NEW_TOKENS] * NUM_STREAMS
        assert all(text == expected for text, _ in results)

        # a new text request needs tokenizing: a clear UNAVAILABLE naming the tokenizer
        with grpc.insecure_channel(router.address) as channel:
            stub = router_pb2_grpc.RouterServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                list(stub.Generate(request(4), timeout=60))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"tokenizer {tokenizer.address}" in (refused.value.details() or "")

        # ... which the gateway answers with 503 and an OpenAI error body
        gateway = start_gateway(router.address, log_dir=tmp_path)
        try:
            body = {
                "model": "smollm2-135m-instruct",
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 4,
            }
            url = f"http://{gateway.address}/v1/chat/completions"
            reply = httpx.post(url, json=body, timeout=60)
            assert reply.status_code == 503, reply.text
            assert "tokenizer" in reply.json()["error"]["message"]

            # a tokenizer back on the same address serves new requests again
            port = tokenizer.address.rsplit(":", 1)[1]
            back = ServiceProc("services.tokenizer", [], "tokenizer-back", int(port), tmp_path)
            with back:
                back.wait_until_serving()
                # the router dials it again within its reconnect backoff (at most 3 s)
                deadline = time.monotonic() + 15
                while True:
                    reply = httpx.post(url, json=body, timeout=120)
                    if reply.status_code != 503 or time.monotonic() > deadline:
                        break
                    time.sleep(0.5)
                assert reply.status_code == 200, reply.text
                assert reply.json()["usage"]["completion_tokens"] >= 1
        finally:
            gateway.stop()
