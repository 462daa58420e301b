"""``bench serve``'s gRPC client against a FAKE ``RouterService``, started here on loopback.

The fake only tests the client: per-token ITL splitting of multi-token messages, usage,
finish reasons and gRPC errors. It is not the router; the real mesh is tested elsewhere.
Timing assertions are lower bounds set by the fake's own sleeps, on times since the start only:
the gap between two messages can shrink when the first is delivered late (a loaded CI machine).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.grpc_backend import GrpcBackend
from benchmarks.serve.timing import RequestResult
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

DELAY = 0.1


@dataclass
class FakeRouter(router_pb2_grpc.RouterServiceServicer):
    """A fake router streaming a fixed script; for testing the client only."""

    script: str = "ok"
    received: list[router_pb2.RouterGenerateRequest] = field(default_factory=list)

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        self.received.append(request)
        if self.script == "invalid":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling_params.top_p: bad")
        if self.script == "slow":
            await asyncio.sleep(30)
        await asyncio.sleep(DELAY)
        yield router_pb2.RouterGenerateResponse(text="a", token_ids=[1], worker_id="w0")
        await asyncio.sleep(DELAY)
        if self.script == "error":
            yield router_pb2.RouterGenerateResponse(
                finish_reason=common_pb2.FINISH_REASON_ERROR, error="worker lost"
            )
            return
        if self.script == "truncated":
            return
        # two tokens in one message, as a router batching its detokenizer output would send
        yield router_pb2.RouterGenerateResponse(text="bc", token_ids=[2, 3])
        await asyncio.sleep(DELAY)
        yield router_pb2.RouterGenerateResponse(
            text="d",
            token_ids=[4],
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=7, completion_tokens=4),
        )


async def run_one(router: FakeRouter, req: BenchRequest, **cfg: Any) -> RequestResult:
    server = grpc.aio.server()
    router_pb2_grpc.add_RouterServiceServicer_to_server(router, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        config = ServeBenchConfig(backend="grpc", grpc_target=f"127.0.0.1:{port}", **cfg)
        async with GrpcBackend(config) as backend:
            return await backend.send(req, "bench-g-0")
    finally:
        await server.stop(0)


def test_grpc_stream_timing_and_usage() -> None:
    router = FakeRouter("ok")
    r = asyncio.run(run_one(router, BenchRequest(0, [5, 6], 2, 4), ignore_eos=True))
    assert r.success, r.error
    assert r.text == "abcd" and r.finish_reason == "length"
    assert r.ttft_s >= DELAY
    # 1 token, then 2 tokens in one message (its gap split in two), then 1 token
    assert len(r.itl_s) == 3
    assert r.itl_s[0] == pytest.approx(r.itl_s[1])
    # Single gaps have no lower bound (a message delivered late shortens the next gap); the time
    # of the last token since the start does: the fake slept 3 DELAYs before sending it.
    assert r.ttft_s + sum(r.itl_s) >= 3 * DELAY
    assert (r.output_tokens, r.prompt_tokens, r.usage_reported, r.chunks) == (4, 7, True, 3)
    assert r.e2e_s >= 3 * DELAY
    sent = router.received[-1]
    assert sent.request_id == "bench-g-0" and list(sent.token_ids.ids) == [5, 6]
    assert sent.sampling_params.max_new_tokens == 4 and sent.sampling_params.ignore_eos


@pytest.mark.parametrize(
    ("script", "message"),
    [
        ("error", "FINISH_REASON_ERROR: worker lost"),
        ("invalid", "INVALID_ARGUMENT: sampling_params.top_p: bad"),
        ("truncated", "without a finish_reason"),
    ],
)
def test_grpc_failures(script: str, message: str) -> None:
    r = asyncio.run(run_one(FakeRouter(script), BenchRequest(0, "hi", 1, 4)))
    assert not r.success and message in r.error


def test_grpc_timeout() -> None:
    r = asyncio.run(run_one(FakeRouter("slow"), BenchRequest(0, "hi", 1, 4), request_timeout=0.3))
    assert not r.success and "timed out after 0.3 s" in r.error
