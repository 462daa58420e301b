"""``python -m benchmarks.routers.echo_worker``: a trivial worker for the router-overhead
benchmark.

One process, one event loop, two faces that answer identically:

- pdmesh's ``WorkerService`` over gRPC (``--grpc-port``): ``Generate`` sends one message with
  the first ``--num-tokens`` prompt ids (cycled when the prompt is shorter, capped by
  ``max_new_tokens``), finish reason LENGTH and usage; ``GetModelInfo``, ``GetLoad``, ``Abort``
  and ``grpc.health.v1``, so a pdmesh router takes it as an aggregated worker;
- SGLang's native HTTP API (``--http-port``, ``sglang_http``): ``/generate`` with ``input_ids``
  returns the same ids, plus what sglang-router asks a worker for.

No model, no tokenizer, no torch: whatever time a request takes beyond a direct call to this
worker is the router's. Echoing the prompt also lets the benchmark check that every arm
returned the right tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc.aio
from aiohttp import web

from benchmarks.routers.sglang_http import Chunk, bound_port, make_app, quiet_http_logs
from pdmesh.config import add_dataclass_args, flag, from_args
from pdmesh.rpc.server import LOG_LEVELS, RpcServer, configure_logging, wait_for_signal
from pdmesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

log = logging.getLogger("benchmarks.routers.echo_worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
MODEL_NAME = "echo"
VOCAB_SIZE = 49152  # SmolLM2's, so the same token ids are valid for the real workers too


@dataclass(frozen=True)
class EchoWorkerConfig:
    host: str = flag("127.0.0.1", "address both servers listen on")
    grpc_port: int = flag(0, "port of the pdmesh WorkerService; 0 picks a free one (logged)")
    http_port: int = flag(0, "port of the SGLang-style HTTP API; 0 picks a free one (logged)")
    num_tokens: int = flag(
        8, "tokens every request gets back (fewer when its max_new_tokens asks for fewer)"
    )
    log_level: str = flag("warning", f"log verbosity: {', '.join(LOG_LEVELS)}")

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"--num-tokens={self.num_tokens} must be >= 1")
        for name in ("grpc_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 65535]")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level={self.log_level!r}; choose {', '.join(LOG_LEVELS)}")


def echo_ids(prompt: list[int], num_tokens: int, max_new_tokens: int | None) -> list[int]:
    """The reply to ``prompt``: its first ids, cycled, ``num_tokens`` of them (or fewer)."""
    n = num_tokens if max_new_tokens is None else min(num_tokens, max_new_tokens)
    return [prompt[i % len(prompt)] for i in range(n)] if prompt else []


class EchoServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, num_tokens: int) -> None:
        self._num_tokens = num_tokens

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        params = request.sampling_params
        limit = params.max_new_tokens if params.HasField("max_new_tokens") else None
        prompt = list(request.token_ids)
        ids = echo_ids(prompt, self._num_tokens, limit)
        yield worker_pb2.GenerateResponse(
            token_ids=ids,
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(prompt), completion_tokens=len(ids)),
        )

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=False)  # every request finishes at once

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLoadResponse:
        return worker_pb2.GetLoadResponse(num_free_pages=1, num_total_pages=1, page_size=16)

    async def GetModelInfo(
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetModelInfoResponse:
        return worker_pb2.GetModelInfoResponse(
            model_name=MODEL_NAME,
            vocab_size=VOCAB_SIZE,
            max_model_len=1 << 20,
            page_size=16,
            dtype="none",
            device="none",
            role="aggregated",
        )


class EchoBackend:
    """The HTTP face: the same reply as ``EchoServicer.Generate``."""

    model_name = MODEL_NAME
    worker_id = ""

    def __init__(self, num_tokens: int) -> None:
        self._num_tokens = num_tokens

    async def load(self) -> dict[str, Any]:
        return {"num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0}

    async def generate(
        self, request_id: str, input_ids: list[int], sampling: dict[str, Any]
    ) -> AsyncIterator[Chunk]:
        ids = echo_ids(input_ids, self._num_tokens, sampling.get("max_new_tokens"))
        yield Chunk(tuple(ids), "length", prompt_tokens=len(input_ids))


async def serve(cfg: EchoWorkerConfig) -> None:
    rpc = RpcServer([SERVICE_NAME])
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(EchoServicer(cfg.num_tokens), rpc.server)
    grpc_port = await rpc.start(cfg.host, cfg.grpc_port)
    runner = web.AppRunner(make_app(EchoBackend(cfg.num_tokens)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.http_port)
    await site.start()
    http_port = bound_port(runner, cfg.http_port)
    # the benchmark reads this line to learn the ports when it passed 0
    print(f"echo worker: grpc {cfg.host}:{grpc_port} http {cfg.host}:{http_port}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await runner.cleanup()
        await rpc.stop(grace=1.0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.routers.echo_worker",
        description=(
            "Trivial worker for python -m benchmarks router-overhead: answers pdmesh's "
            "WorkerService over gRPC and SGLang's native HTTP API (/generate with input_ids, "
            "/health, /model_info, /server_info, /get_load) identically, echoing the first "
            "--num-tokens prompt ids at once. No model, no tokenizer. SIGTERM or Ctrl-C stops "
            "it."
        ),
    )
    add_dataclass_args(parser, EchoWorkerConfig)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = from_args(EchoWorkerConfig, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(cfg.log_level)
    quiet_http_logs()
    try:
        asyncio.run(serve(cfg))
    except OSError as e:  # a taken port
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
