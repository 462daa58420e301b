"""The ``pdmesh.v1.BootstrapService`` servicer: thin, over ``pdmesh.pd.bootstrap.Bootstrap``.

A Transfer call that ends before its room did (the decode cancelled, its deadline passed, it
died) fails the room from the call's done-callback, which grpc runs however the handler was
left: the prefill request stops wherever it is and frees its pages.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc.aio

from pdmesh.pd.bootstrap import Bootstrap
from pdmesh.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from services.worker import pd_convert

SERVICE_NAME = bootstrap_pb2.DESCRIPTOR.services_by_name["BootstrapService"].full_name


class BootstrapServicer(bootstrap_pb2_grpc.BootstrapServiceServicer):
    def __init__(self, bootstrap: Bootstrap) -> None:
        self._bootstrap = bootstrap

    async def RegisterDecode(
        self, request: bootstrap_pb2.RegisterDecodeRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.RegisterDecodeResponse:
        instance_id = self._bootstrap.register(pd_convert.registration_from_pb(request))
        transport = self._bootstrap.decodes.transport(request.decode_id)
        return bootstrap_pb2.RegisterDecodeResponse(instance_id=instance_id, transport=transport)

    async def Transfer(
        self, request: bootstrap_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bootstrap_pb2.TransferEvent]:
        room = self._bootstrap.attach(
            request.room, request.decode_id, request.request_id, list(request.dst_page_ids)
        )
        context.add_done_callback(lambda _: Bootstrap.abandon(room, request.decode_id))
        async for event in Bootstrap.events(room):
            yield pd_convert.event_to_pb(event)

    async def Ping(
        self, request: bootstrap_pb2.PingRequest, context: grpc.aio.ServicerContext
    ) -> bootstrap_pb2.PingResponse:
        return bootstrap_pb2.PingResponse(
            instance_id=self._bootstrap.instance_id, num_rooms=len(self._bootstrap.rooms)
        )
