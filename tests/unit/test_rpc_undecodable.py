"""A request message that does not parse is the client's error: INVALID_ARGUMENT with an
ErrorDetail, never grpc's UNKNOWN (found by the gRPC fuzzer: truncated bytes, invalid UTF-8 in a
string field). Checked on a bare ``RpcServer`` (health and reflection only), for a unary
request and for a streamed one, and the server keeps serving."""

from __future__ import annotations

import asyncio

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.rpc.errors import error_detail
from pdmesh.rpc.server import RpcServer

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
BAD_MESSAGES = [
    b"\xff",  # a field key that never ends
    b"\x0a\x05ab",  # a string field cut short
    b"\x0a\x02\xff\xfe",  # invalid UTF-8 in the string field `service`
]


def _identity(raw: bytes) -> bytes:
    return raw


async def _status_of(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call  # type: ignore[misc]
    return e.value


@pytest.mark.parametrize("raw", BAD_MESSAGES, ids=["key", "truncated", "utf8"])
def test_undecodable_requests_are_invalid_argument(raw: bytes) -> None:
    async def scenario() -> None:
        rpc = RpcServer(["pdmesh.v1.Test"])
        port = await rpc.start("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                unary = channel.unary_unary(
                    HEALTH_CHECK, request_serializer=_identity, response_deserializer=_identity
                )
                error = await _status_of(unary(raw, timeout=5))
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
                detail = error_detail(error)
                assert detail is not None and detail.field == "request"
                assert "HealthCheckRequest" in detail.reason

                streamed = channel.stream_stream(
                    REFLECTION, request_serializer=_identity, response_deserializer=_identity
                )
                call = streamed(iter([raw]), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    async for _ in call:
                        pass
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()

                # a good message on the same server still works
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await rpc.stop(grace=1)

    asyncio.run(scenario())
