"""The ``pdmesh.v1.WorkerService`` servicer of aggregated and decode workers.

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

from pdmesh.engine import AsyncEngine, InvalidRequestError, RequestOutput
from pdmesh.pd.sides import DecodeSide
from pdmesh.rpc.multiplex import Sessions
from pdmesh.telemetry import Metrics, event, set_attributes, span
from pdmesh.telemetry.spans import DECODE, FIRST_TOKEN
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.worker import convert
from services.worker.calls import LiveCalls
from services.worker.stream import StreamSession

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name


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
