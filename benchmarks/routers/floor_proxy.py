"""``python -m benchmarks.routers.floor_proxy``: the least a Python gRPC router hop can cost.

A ``grpc.aio`` server speaking pdmesh's ``RouterService.Generate`` (token-id prompts only) that
forwards each request to the next ``--workers`` address round-robin and passes the worker's
messages back: no policy, no retries, no breakers, no interceptors, no metrics. The
router-overhead benchmark runs it as the ``grpc-floor`` arm, so the report separates what
pdmesh's router adds on top of the transport from what ``grpc.aio`` itself costs per hop.
Not a router: anything but ``token_ids`` input gets INVALID_ARGUMENT, a worker error is passed
through as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.rpc.server import wait_for_signal
from pdmesh.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc


@dataclass(frozen=True)
class FloorProxyConfig:
    host: str = flag("127.0.0.1", "address to listen on")
    port: int = flag(0, "gRPC port; 0 picks a free one (printed)")
    workers: str = flag("", "comma-separated host:port of the WorkerService instances to call")

    def __post_init__(self) -> None:
        if not self.addresses():
            raise ValueError("--workers must name at least one host:port")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535]")

    def addresses(self) -> list[str]:
        return [a.strip() for a in self.workers.split(",") if a.strip()]


class FloorProxy(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, addresses: list[str]) -> None:
        self._channels = [grpc.aio.insecure_channel(a) for a in addresses]
        self._stubs = [worker_pb2_grpc.WorkerServiceStub(c) for c in self._channels]
        self._turn = itertools.count()

    async def Generate(
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        if request.WhichOneof("input") != "token_ids":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "token_ids only")
        stub = self._stubs[next(self._turn) % len(self._stubs)]
        upstream = worker_pb2.GenerateRequest(
            request_id=request.request_id,
            token_ids=request.token_ids.ids,
            sampling_params=request.sampling_params,
        )
        try:
            async for out in stub.Generate(upstream, timeout=context.time_remaining()):
                yield router_pb2.RouterGenerateResponse(
                    token_ids=out.token_ids, finish_reason=out.finish_reason, usage=out.usage
                )
        except grpc.aio.AioRpcError as e:
            await context.abort(e.code(), e.details() or "")

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def serve(cfg: FloorProxyConfig) -> None:
    server = grpc.aio.server()
    proxy = FloorProxy(cfg.addresses())
    router_pb2_grpc.add_RouterServiceServicer_to_server(proxy, server)
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    await checks.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"floor proxy on {cfg.host}:{port}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await server.stop(grace=1.0)
        await proxy.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routers.floor_proxy",
        description=(
            "Bare grpc.aio pass-through of RouterService.Generate (token ids) to --workers, "
            "round-robin: the floor of a Python gRPC router hop, for the router-overhead "
            "benchmark. SIGTERM or Ctrl-C stops it."
        ),
    )
    add_dataclass_args(parser, FloorProxyConfig)
    try:
        cfg = from_args(FloorProxyConfig, parser.parse_args(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    asyncio.run(serve(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
