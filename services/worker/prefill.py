"""The prefill worker's ``pdmesh.v1.WorkerService`` servicer (the prefill role's; its
``BootstrapService`` is ``services.worker.bootstrap``).

Handlers are thin: proto in → ``pdmesh.pd.prefill.PrefillRunner`` → proto out; errors escape to
``pdmesh.rpc``'s interceptor. A Generate call that ends before its room did fails the room and
frees the pages (``services.worker.calls.LiveCalls``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc.aio

from pdmesh.engine import AsyncEngine, InvalidRequestError
from pdmesh.pd.prefill import PrefillRunner
from pdmesh.pd.rooms import RoomTable
from pdmesh.v1 import worker_pb2, worker_pb2_grpc
from services.worker import convert
from services.worker.calls import LiveCalls

log = logging.getLogger(__name__)


class PrefillServicer(worker_pb2_grpc.WorkerServiceServicer):
    def __init__(
        self,
        engine: AsyncEngine,
        runner: PrefillRunner,
        rooms: RoomTable,
        model_info: worker_pb2.GetModelInfoResponse,
    ) -> None:
        self._engine = engine
        self._runner = runner
        self._rooms = rooms
        self._model_info = model_info
        self._calls = LiveCalls()

    async def Generate(
        self, request: worker_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.GenerateResponse]:
        if not request.HasField("disagg"):
            raise InvalidRequestError(
                "disagg",
                "a prefill worker serves only the prefill half of disaggregated requests "
                "(set disagg.bootstrap_room); send whole requests to a decode or aggregated worker",
            )
        params = convert.request_params_from_pb(request)
        request_id, room = request.request_id, request.disagg.bootstrap_room
        call = self._calls.claim(request_id, context, lambda: self._runner.abort(request_id))
        try:
            out = await self._runner.run(request_id, list(request.token_ids), params, room)
        except InvalidRequestError as e:
            raise convert.wire_error(e) from e
        finally:
            call.closed = True
        yield convert.output_to_pb(out)

    def drain(self) -> None:
        """Nothing to end early: a prefill serves no long-lived Stream calls."""

    async def Abort(
        self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.AbortResponse:
        found = self._runner.abort(request.request_id, "was aborted (Abort)")
        return worker_pb2.AbortResponse(found=found)

    async def GetLoad(
        self, request: worker_pb2.GetLoadRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetLoadResponse:
        reply = convert.load_to_pb(await self._engine.load())
        reply.num_rooms = len(self._rooms)
        reply.total_rooms = self._rooms.total
        return reply

    async def GetModelInfo(
        self, request: worker_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.GetModelInfoResponse:
        return self._model_info
