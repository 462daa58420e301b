"""``sglang.grpc.scheduler.SglangScheduler`` on a pdmesh worker, beside its
``pdmesh.v1.WorkerService`` on the same gRPC server: SGLang's gateway (``smg`` in gRPC mode) and
pdmesh's router with ``sglang-grpc`` workers drive pdmesh workers through it.

Generate and Abort are the worker's own handlers behind a conversion (``convert``), so SGLang
requests get exactly pdmesh's behaviour: the same validation and typed errors (mapped to gRPC
statuses by ``pdmesh.rpc``), the same cancellation (a cancelled call aborts the request and frees
its pages) and, with ``disaggregated_params``, the same PD flow — a prefill worker prefills into
the room, a decode worker fetches the KV from the prefill's bootstrap server at
``bootstrap_host:bootstrap_port``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import zipfile
from collections.abc import AsyncGenerator, AsyncIterator
from typing import NoReturn, Protocol, cast

import grpc
import grpc.aio

from pdmesh.engine import AsyncEngine
from pdmesh.errors import EngineError, FailedPreconditionError, InvalidRequestError
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.sglang import sglang_scheduler_pb2_grpc, smg_common_pb2
from pdmesh.v1 import worker_pb2
from services.sglang_grpc import convert, info
from services.sglang_grpc.info import WorkerFacts

SERVICE_NAME = sgl.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
HEALTH_TIMEOUT_S = 5.0  # an engine that cannot answer a load query in this long is not healthy
TOKENIZER_CHUNK_BYTES = 1 << 20
# what a gateway needs to tokenize and render chats like the worker's model expects
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)


class WorkerHandlers(Protocol):
    """The pdmesh ``WorkerService`` handlers this servicer sits on (decode or prefill)."""

    def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]: ...

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse: ...


class SglangSchedulerServicer(sglang_scheduler_pb2_grpc.SglangSchedulerServicer):
    def __init__(self, worker: WorkerHandlers, engine: AsyncEngine, facts: WorkerFacts) -> None:
        self._worker = worker
        self._engine = engine
        self._facts = facts

    async def Generate(
        self, request: sgl.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[sgl.GenerateResponse]:
        worker_request = convert.generate_request_from_pb(request)
        replies = convert.ReplyStream(
            request.request_id, len(worker_request.token_ids), stream=request.stream
        )
        # the worker's handler is an async generator: closing it (however this call ends)
        # stops the request and frees its pages
        outputs = cast(
            AsyncGenerator[worker_pb2.GenerateResponse, None],
            self._worker.Generate(worker_request, context),
        )
        try:
            async with contextlib.aclosing(outputs):
                async for reply in outputs:
                    for out in replies.push(reply):
                        yield out
        except InvalidRequestError as e:
            raise convert.sglang_error(e) from e

    async def Abort(
        self, request: sgl.AbortRequest, context: grpc.aio.ServicerContext
    ) -> sgl.AbortResponse:
        reply = await self._worker.Abort(
            worker_pb2.AbortRequest(request_id=request.request_id), context
        )
        state = "aborted" if reply.found else "not found (unknown or already finished)"
        return sgl.AbortResponse(
            success=reply.found, message=f"request {request.request_id} {state}"
        )

    async def HealthCheck(
        self, request: sgl.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> sgl.HealthCheckResponse:
        # the engine thread answers commands between steps: a load query that comes back
        # proves it is alive and stepping (cheaper than SGLang's one-token generation)
        try:
            await asyncio.wait_for(self._engine.load(), HEALTH_TIMEOUT_S)
        except (EngineError, asyncio.TimeoutError) as e:
            return sgl.HealthCheckResponse(healthy=False, message=f"engine not answering: {e!r}")
        return sgl.HealthCheckResponse(healthy=True, message="ok")

    async def GetModelInfo(
        self, request: sgl.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> sgl.GetModelInfoResponse:
        return info.model_info_to_pb(self._facts)

    async def GetServerInfo(
        self, request: sgl.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> sgl.GetServerInfoResponse:
        return info.server_info_to_pb(self._facts, await self._engine.load())

    async def GetLoads(
        self, request: sgl.GetLoadsRequest, context: grpc.aio.ServicerContext
    ) -> sgl.GetLoadsResponse:
        return info.loads_to_pb(self._facts, await self._engine.load())

    async def GetTokenizer(
        self, request: smg_common_pb2.GetTokenizerRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[smg_common_pb2.GetTokenizerChunk]:
        archive = tokenizer_archive(self._facts)
        digest = hashlib.sha256(archive).hexdigest()
        for start in range(0, len(archive), TOKENIZER_CHUNK_BYTES):
            end = start + TOKENIZER_CHUNK_BYTES
            last = end >= len(archive)
            yield smg_common_pb2.GetTokenizerChunk(
                data=archive[start:end], sha256=digest if last else ""
            )

    # -- what pdmesh workers do not do: a clear UNIMPLEMENTED (gateways probe some of these at
    # registration, e.g. smg subscribes to KV events and falls back when refused)

    async def Embed(
        self, request: sgl.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> sgl.EmbedResponse:
        await _unimplemented(context, "embeddings")

    async def FlushCache(
        self, request: smg_common_pb2.FlushCacheRequest, context: grpc.aio.ServicerContext
    ) -> smg_common_pb2.FlushCacheResponse:
        await _unimplemented(context, "flushing the prefix cache")

    async def StartProfile(
        self, request: smg_common_pb2.StartProfileRequest, context: grpc.aio.ServicerContext
    ) -> smg_common_pb2.ProfileResponse:
        await _unimplemented(context, "the profiler")

    async def StopProfile(
        self, request: smg_common_pb2.StopProfileRequest, context: grpc.aio.ServicerContext
    ) -> smg_common_pb2.ProfileResponse:
        await _unimplemented(context, "the profiler")

    async def SubscribeKvEvents(
        self, request: smg_common_pb2.SubscribeKvEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[smg_common_pb2.KvEventBatch]:
        await _unimplemented(context, "KV cache events")
        yield smg_common_pb2.KvEventBatch()  # unreachable: makes this a streaming handler

    async def LoadLoRAAdapter(
        self, request: sgl.LoadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> sgl.LoadLoRAAdapterResponse:
        await _unimplemented(context, "LoRA adapters")

    async def UnloadLoRAAdapter(
        self, request: sgl.UnloadLoRAAdapterRequest, context: grpc.aio.ServicerContext
    ) -> sgl.UnloadLoRAAdapterResponse:
        await _unimplemented(context, "LoRA adapters")

    async def ListLoadedLoRAAdapters(
        self, request: sgl.ListLoadedLoRAAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> sgl.ListLoadedLoRAAdaptersResponse:
        await _unimplemented(context, "LoRA adapters")


async def _unimplemented(context: grpc.aio.ServicerContext, what: str) -> NoReturn:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"pdmesh workers do not serve {what}")
    raise AssertionError("unreachable: context.abort raises")


def tokenizer_archive(facts: WorkerFacts) -> bytes:
    """A zip of the model's tokenizer files (flat, as in the model directory)."""
    directory = facts.tokenizer_dir
    if directory is None:
        raise FailedPreconditionError(
            f"model {facts.source.name!r} has no local tokenizer files (random weights?)"
        )
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in TOKENIZER_FILES:
            if (directory / name).is_file():
                archive.write(directory / name, arcname=name)
    return buffer.getvalue()


def add_to_server(
    server: grpc.aio.Server,
    worker: WorkerHandlers,
    engine: AsyncEngine,
    model_info: worker_pb2.GetModelInfoResponse,
) -> None:
    """Serve SGLang's protocol on ``server`` beside ``worker`` (whose GetModelInfo reply is
    ``model_info``). Put ``SERVICE_NAME`` among the server's service names too, so health and
    reflection know it."""
    info = engine.info
    facts = WorkerFacts(model_info, info.source, info.config.max_running_requests)
    servicer = SglangSchedulerServicer(worker, engine, facts)
    sglang_scheduler_pb2_grpc.add_SglangSchedulerServicer_to_server(servicer, server)
