"""``python -m benchmarks.routers.sglang_shim``: SGLang's native HTTP API in front of one
pdmesh worker, so sglang-router can route to pdmesh's engines.

sglang-router speaks HTTP to SGLang servers; pdmesh workers speak gRPC. This shim (one per
worker) turns ``POST /generate`` with ``input_ids`` into the worker's ``WorkerService.Generate``
and the worker's messages back into SGLang's body (or its server-sent events with ``stream``),
with the worker's ``cached_tokens`` (its prefix-cache hits) in ``meta_info`` and the worker's
address as ``meta_info.pdmesh_worker``. ``/get_load`` reports the worker's ``GetLoad``.
The routing-quality benchmark puts sglang-router in front of these shims: the same engines the
pdmesh router reaches directly, one HTTP hop further (a millisecond next to CPU prefills of
hundreds). Token ids only: nothing here has a tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from aiohttp import web

from benchmarks.routers.sglang_http import (
    Chunk,
    GenerateError,
    bound_port,
    make_app,
    quiet_http_logs,
)
from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.rpc.server import wait_for_signal
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_ERROR: "error",
}
# gRPC codes a client caused map to 4xx, the rest to 5xx (sglang-router retries those)
CLIENT_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 408,
}


@dataclass(frozen=True)
class ShimConfig:
    worker: str = flag("", "host:port of the pdmesh worker (python -m services.decode) to front")
    host: str = flag("127.0.0.1", "address the HTTP API listens on")
    port: int = flag(0, "HTTP port; 0 picks a free one (printed)")
    request_timeout: float = flag(600.0, "deadline in seconds of each Generate call")
    rpc_timeout: float = flag(10.0, "deadline in seconds of GetModelInfo and GetLoad calls")

    def __post_init__(self) -> None:
        if ":" not in self.worker:
            raise ValueError(f"--worker={self.worker!r} is not host:port")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535]")
        for name in ("request_timeout", "rpc_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0")


def sampling_to_pb(sampling: dict[str, Any]) -> common_pb2.SamplingParams:
    """SGLang's sampling_params (the keys ``sglang_http`` lets through) as pdmesh's."""
    given = {k: v for k, v in sampling.items() if v is not None and k != "detokenize"}
    return common_pb2.SamplingParams(**given)


class WorkerBackend:
    """``sglang_http.Backend`` over one pdmesh worker's gRPC API."""

    def __init__(self, cfg: ShimConfig) -> None:
        self._cfg = cfg
        self._channel = grpc.aio.insecure_channel(cfg.worker)
        self._stub = worker_pb2_grpc.WorkerServiceStub(self._channel)
        self.model_name = ""
        self.worker_id = cfg.worker

    async def start(self) -> None:
        info = await self._stub.GetModelInfo(
            worker_pb2.GetModelInfoRequest(), timeout=self._cfg.rpc_timeout, wait_for_ready=True
        )
        self.model_name = info.model_name

    async def close(self) -> None:
        await self._channel.close()

    async def load(self) -> dict[str, Any]:
        load = await self._stub.GetLoad(worker_pb2.GetLoadRequest(), timeout=self._cfg.rpc_timeout)
        used_pages = load.num_total_pages - load.num_free_pages
        # SGLang's shape: one entry per data-parallel rank
        return {
            "dp_rank": 0,
            "num_reqs": load.num_running,
            "num_waiting_reqs": load.num_waiting,
            "num_tokens": used_pages * load.page_size,
        }

    async def generate(
        self, request_id: str, input_ids: list[int], sampling: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        try:
            params = sampling_to_pb(sampling)
        except (TypeError, ValueError) as e:
            raise GenerateError(400, f"bad sampling_params: {e}") from e
        request = worker_pb2.GenerateRequest(
            request_id=request_id, token_ids=input_ids, sampling_params=params
        )
        call = self._stub.Generate(request, timeout=self._cfg.request_timeout)
        try:
            async for out in call:
                reason = FINISH_REASONS.get(out.finish_reason)
                yield Chunk(
                    tuple(out.token_ids),
                    reason,
                    prompt_tokens=out.usage.prompt_tokens,
                    cached_tokens=out.usage.cached_tokens,
                    error=out.error if out.HasField("error") else "",
                )
        except grpc.aio.AioRpcError as e:
            status = CLIENT_CODES.get(e.code(), 503)
            raise GenerateError(status, f"{e.code().name}: {e.details()}") from e
        finally:
            call.cancel()  # a client that went away frees the worker's pages at once


async def serve(cfg: ShimConfig) -> None:
    backend = WorkerBackend(cfg)
    await backend.start()
    runner = web.AppRunner(make_app(backend), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.port)
    await site.start()
    port = bound_port(runner, cfg.port)
    print(f"sglang shim for {cfg.worker} on http://{cfg.host}:{port}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()
        await backend.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routers.sglang_shim",
        description=(
            "SGLang-native HTTP API (/generate with input_ids, /health, /model_info, "
            "/server_info, /get_load) in front of one pdmesh worker's gRPC WorkerService, so "
            "sglang-router can route to pdmesh engines. SIGTERM or Ctrl-C stops it."
        ),
    )
    add_dataclass_args(parser, ShimConfig)
    try:
        cfg = from_args(ShimConfig, parser.parse_args(argv))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    quiet_http_logs()
    try:
        asyncio.run(serve(cfg))
    except (OSError, grpc.aio.AioRpcError) as e:  # a taken port; a worker that never answered
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
