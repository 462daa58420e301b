"""The ``pdmesh.v1.WorkerService`` servicer of aggregated and decode workers, and the worker's
entry coroutine.

Handlers are thin: proto in → engine (or, for a disaggregated request, ``pdmesh.pd``'s
``DisaggDecoder``) → proto out. Errors escape to ``pdmesh.rpc``'s interceptor
(InvalidRequestError → INVALID_ARGUMENT, ResourceExhaustedError → RESOURCE_EXHAUSTED, ...); the
only translation here is renaming the engine's argument names to the wire's field names. A call
that ends before its request finished stops the request (``calls.LiveCalls``).

In ``--mode decode`` a request with ``disagg`` set gets its prompt's KV and first token from the
prefill named there; one without is prefilled here (the router's conditional disaggregation).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import cast

import grpc.aio

from pdmesh.discovery import (
    META_IB_DEVICE,
    META_KV_BACKEND,
    META_KV_PROTOCOL,
    META_MODEL,
    META_PAGE_SIZE,
    TAG_AGG,
    TAG_DECODE,
    WORKER,
    make_discovery,
    registered,
    registration_for,
)
from pdmesh.engine import AsyncEngine, InvalidRequestError, LLMEngine, RequestOutput
from pdmesh.engine.engine_process import EngineProcess
from pdmesh.rpc.multiplex import Sessions
from pdmesh.rpc.server import RpcServer, wait_for_signal
from pdmesh.telemetry import Metrics, event, set_attributes, span
from pdmesh.telemetry.spans import DECODE, FIRST_TOKEN
from pdmesh.v1 import kv_transfer_pb2, worker_pb2, worker_pb2_grpc
from services.decode import convert
from services.decode.calls import LiveCalls
from services.decode.config import WorkerServiceConfig
from services.decode.disagg import DecodeSide, open_decode_side
from services.decode.stream import StreamSession
from services.mesh import MeshOptions, Observed
from services.sglang_grpc import servicer as sglang_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
KV_RECEIVER_SERVICE = kv_transfer_pb2.DESCRIPTOR.services_by_name["KVReceiverService"].full_name


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        model_info: worker_pb2.GetModelInfoResponse,
        decode_side: DecodeSide | None = None,
        stream_interval: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        """``decode_side``: set in --mode decode, for requests with ``disagg``;
        ``stream_interval``: ``--stream-interval`` of the Stream calls; ``metrics``: the
        process's, where each request of a Stream counts as a Generate call."""
        self._metrics = metrics
        self._engine = engine
        self._model_info = model_info
        self._decode_side = decode_side
        self._stream_interval = stream_interval
        self._calls = LiveCalls()
        self._stream_ids: set[str] = set()  # requests open on Stream calls
        self._sessions: Sessions[StreamSession] = Sessions()

    async def Stream(
        self,
        request_iterator: AsyncIterator[worker_pb2.WorkerStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[worker_pb2.WorkerStreamResponse]:
        session = StreamSession(
            self._engine,
            self._decode_side,
            self._claim_stream_id,
            self._stream_ids.discard,
            self._stream_interval,
            self._metrics,
        )
        async for batch in self._sessions.serve(session, request_iterator, context):
            yield batch

    def _claim_stream_id(self, request_id: str) -> None:
        if request_id in self._stream_ids or request_id in self._calls:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        self._stream_ids.add(request_id)

    def drain(self) -> None:
        """The worker is stopping: its Stream calls take no new requests and end once their
        open ones finished (the grace period bounds that)."""
        self._sessions.drain()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        params = convert.request_params_from_pb(request)
        request_id, prompt = request.request_id, list(request.token_ids)
        if request_id in self._stream_ids:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        if request.HasField("disagg"):
            if self._decode_side is None:
                raise convert.not_a_decode_worker()
            decoder = self._decode_side.decoder
            call = self._calls.claim(request_id, context, lambda: self._stop(request_id))
            prefill = convert.remote_prefill_from_pb(request.disagg)
            stream = decoder.generate(request_id, prompt, params, prefill)
        else:
            call = self._calls.claim(
                request_id, context, lambda: self._engine.abort_soon(request_id)
            )
            stream = self._engine.generate(request_id, prompt, params)
        # generate() is an async generator (annotated as an iterator): aclosing closes it,
        # and so stops the request, even when this handler is closed at a yield
        outputs = cast(AsyncGenerator[RequestOutput, None], stream)
        try:
            with span(DECODE, request_id=request_id, prompt_tokens=len(prompt)):
                async with contextlib.aclosing(outputs):
                    num_tokens = 0
                    try:
                        async for out in outputs:
                            if num_tokens == 0 and out.new_token_ids:
                                event(FIRST_TOKEN)
                            num_tokens += len(out.new_token_ids)
                            if out.finish_reason is not None:
                                set_attributes(finish_reason=out.finish_reason.value)
                            yield convert.output_to_pb(out)
                    finally:  # also when the call ends early: what was sent so far
                        set_attributes(output_tokens=num_tokens)
        except InvalidRequestError as e:
            raise convert.wire_error(e) from e
        finally:
            call.closed = True

    def _stop(self, request_id: str) -> None:
        """Stop a request wherever it is, without waiting (from done-callbacks)."""
        waiting = self._decode_side is not None and self._decode_side.decoder.cancel(request_id)
        if not waiting:
            self._engine.abort_soon(request_id)

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        if self._decode_side is not None and self._decode_side.decoder.cancel(request.request_id):
            return worker_pb2.AbortResponse(found=True)  # it was waiting for its KV
        return worker_pb2.AbortResponse(found=await self._engine.abort(request.request_id))

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLoadResponse:
        reply = convert.load_to_pb(await self._engine.load())
        if self._decode_side is not None:
            reply.num_rooms = self._decode_side.decoder.num_rooms
            reply.total_rooms = self._decode_side.decoder.total_rooms
        return reply

    async def GetModelInfo(
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetModelInfoResponse:
        return self._model_info


async def serve(
    config: WorkerServiceConfig,
    engine: LLMEngine | EngineProcess,
    mesh: MeshOptions | None = None,
) -> None:
    """Serve ``engine`` until SIGTERM/SIGINT, registered (``--discovery consul``) while
    serving; on the signal it deregisters at once, then in-flight generations drain for the
    grace period (the engine keeps stepping meanwhile), then the engine thread stops."""
    mesh = mesh or MeshOptions()
    # with --engine-process the engine runs (already loaded) in a process of its own
    async_engine = engine if isinstance(engine, EngineProcess) else AsyncEngine(engine)
    async_engine.start()
    observed = Observed.start("pdmesh-decode", config.host, mesh.telemetry)
    names = [SERVICE_NAME, sglang_grpc.SERVICE_NAME]  # SGLang's protocol beside ours
    if config.mode == "decode" and config.kv_transfer_backend == "grpc":
        names.append(KV_RECEIVER_SERVICE)  # hosted here: health and reflection name it
    rpc = RpcServer(names, interceptors=observed.interceptors(), tls=mesh.tls)
    decode_side = None
    if config.mode == "decode":
        decode_side = open_decode_side(config, async_engine, rpc, mesh.tls)
    model_info = convert.model_info_to_pb(
        async_engine.info, role=config.mode, migration_limit=config.migration_limit
    )
    servicer = WorkerServicer(
        async_engine, model_info, decode_side, config.stream_interval, observed.metrics
    )
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, rpc.server)
    rpc.on_drain.append(servicer.drain)
    sglang_grpc.add_to_server(rpc.server, servicer, async_engine, model_info)
    tag = TAG_DECODE if config.mode == "decode" else TAG_AGG
    meta = {
        META_MODEL: model_info.model_name,
        META_PAGE_SIZE: model_info.page_size,
        META_KV_BACKEND: config.kv_transfer_backend if config.mode == "decode" else None,
        META_KV_PROTOCOL: decode_side.receiver.transport if decode_side is not None else None,
        META_IB_DEVICE: config.disaggregation_ib_device if decode_side is not None else None,
        **observed.meta(),
    }
    registration = registration_for(
        mesh.discovery, WORKER, config.host, 0, (tag,), meta, grpc_tls=mesh.tls.serves_tls
    )
    discovery = make_discovery(mesh.discovery)
    try:
        # serve_registered's steps, with the decode side told the bound port before the
        # instance is registered (a router may send disaggregated work at once)
        bound = await rpc.start(config.host, config.port)
        if decode_side is not None:
            decode_side.started(config.kv_transfer_host or config.host, bound)
        log.info("%s (%s) listening on %s:%d", SERVICE_NAME, config.mode, config.host, bound)
        try:
            async with registered(discovery, registration.with_port(bound)) as handle:
                sig = await wait_for_signal()
                log.info(
                    "%s received; deregistering, then draining in-flight calls for up to %.1fs",
                    sig.name,
                    config.grace_period,
                )
                await handle.deregister()
        finally:
            await rpc.stop(config.grace_period)
            await discovery.close()
        log.info("stopped")
    finally:
        if decode_side is not None:
            await decode_side.close()
        async_engine.shutdown()
        observed.close()
