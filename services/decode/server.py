"""The ``pdmesh.v1.WorkerService`` servicer and the worker's entry coroutine.

Handlers are thin: proto in → ``AsyncEngine`` → proto out. Engine errors escape to
``pdmesh.rpc``'s interceptor (InvalidRequestError → INVALID_ARGUMENT, ResourceExhaustedError →
RESOURCE_EXHAUSTED, ...); the only translation here is renaming the engine's argument names to
the wire's field names.

NOTE on cancellation: a Generate call can end three ways — its last output, an exception, or the
client going away (cancel, deadline, disconnect). ``AsyncEngine.generate`` aborts the request
when its iterator is closed early, but grpc may cancel the call while the handler is parked at a
``yield``, in which case nothing closes the iterator until the garbage collector does. So each
call also registers a done-callback that aborts its request if it had not finished: the pages
are freed as soon as grpc notices the cancellation, whatever the handler was doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import cast

import grpc.aio

from pdmesh.engine import AsyncEngine, InvalidRequestError, LLMEngine, RequestOutput
from pdmesh.rpc.server import RpcServer, serve_until_signal
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.decode import convert
from services.decode.config import WorkerServiceConfig

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


@dataclass(eq=False)
class _Call:
    """One Generate call's claim on its request id (identity matters: ids can be reused)."""

    request_id: str
    # the engine stream was closed (its last output, an error, or a cancel that reached it):
    # AsyncEngine has then already aborted the request if it had to
    closed: bool = False


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(self, engine: AsyncEngine, model_info: worker_pb2.GetModelInfoResponse) -> None:
        self._engine = engine
        self._model_info = model_info
        self._calls: dict[str, _Call] = {}  # live Generate calls by request id
        self._aborts: set[asyncio.Task[bool]] = set()  # keeps abort tasks alive until done

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        params = convert.sampling_params_from_pb(request.sampling_params)
        call = self._claim(request.request_id)
        context.add_done_callback(lambda _: self._on_call_done(call))
        # generate() is an async generator (annotated as an iterator): aclosing closes it,
        # and so aborts the request, even when this handler is closed at a yield
        outputs = cast(
            AsyncGenerator[RequestOutput, None],
            self._engine.generate(call.request_id, list(request.token_ids), params),
        )
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    yield convert.output_to_pb(out)
        except InvalidRequestError as e:
            raise convert.wire_error(e) from e
        finally:
            call.closed = True

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        return worker_pb2.AbortResponse(found=await self._engine.abort(request.request_id))

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLoadResponse:
        return convert.load_to_pb(await self._engine.load())

    async def GetModelInfo(
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetModelInfoResponse:
        return self._model_info

    def _claim(self, request_id: str) -> _Call:
        # checked here, not only in the engine: AsyncEngine keys its output queues by id, so a
        # duplicate reaching it would steal the live request's stream before being rejected
        if request_id in self._calls:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        call = _Call(request_id)
        self._calls[request_id] = call
        return call

    def _on_call_done(self, call: _Call) -> None:
        if self._calls.get(call.request_id) is call:
            del self._calls[call.request_id]
        if call.closed:
            return
        log.info("request %r ended before finishing (client went away); aborting", call.request_id)
        task = asyncio.get_running_loop().create_task(self._engine.abort(call.request_id))
        self._aborts.add(task)
        task.add_done_callback(self._abort_done)

    def _abort_done(self, task: asyncio.Task[bool]) -> None:
        self._aborts.discard(task)
        if not task.cancelled() and task.exception() is not None:  # e.g. the engine stopped
            log.warning("abort failed: %s", task.exception())


async def serve(config: WorkerServiceConfig, engine: LLMEngine) -> None:
    """Serve ``engine`` until SIGTERM/SIGINT; in-flight generations drain for the grace period
    (the engine keeps stepping meanwhile), then the engine thread stops."""
    async_engine = AsyncEngine(engine)
    async_engine.start()
    rpc = RpcServer([SERVICE_NAME])
    servicer = WorkerServicer(async_engine, convert.model_info_to_pb(engine))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, rpc.server)
    try:
        await serve_until_signal(rpc, config.host, config.port, config.grace_period)
    finally:
        async_engine.shutdown()
