"""The prefill worker's ``pdmesh.v1.WorkerService`` servicer and its entry coroutine, which also
runs the ``BootstrapService`` on its own port.

Handlers are thin: proto in → ``pdmesh.pd.prefill.PrefillRunner`` → proto out; errors escape to
``pdmesh.rpc``'s interceptor. A Generate call that ends before its room did fails the room and
frees the pages (``services.decode.calls.LiveCalls``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc.aio

from pdmesh.discovery import (
    META_BOOTSTRAP_PORT,
    META_IB_DEVICE,
    META_KV_BACKEND,
    META_KV_PROTOCOL,
    META_MODEL,
    META_PAGE_SIZE,
    PREFILL,
    TAG_PREFILL,
    make_discovery,
    registered,
    registration_for,
)
from pdmesh.engine import AsyncEngine, InvalidRequestError, LLMEngine
from pdmesh.errors import AbortedError
from pdmesh.kv_transfer import get_backend
from pdmesh.kv_transfer.mooncake_transport import MOONCAKE_BACKENDS, describe
from pdmesh.pd.bootstrap import Bootstrap
from pdmesh.pd.budget import OptimisticBudget
from pdmesh.pd.prefill import PrefillRunner
from pdmesh.pd.registry import DecodeRegistry
from pdmesh.pd.rooms import RoomTable
from pdmesh.rpc.server import RpcServer, wait_for_signal
from pdmesh.v1 import bootstrap_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.decode import convert
from services.decode.calls import LiveCalls
from services.mesh import MeshOptions, Observed
from services.prefill.bootstrap import SERVICE_NAME as BOOTSTRAP_SERVICE
from services.prefill.bootstrap import BootstrapServicer
from services.prefill.config import PrefillServiceConfig
from services.sglang_grpc import servicer as sglang_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["WorkerService"].full_name
BOOTSTRAP_DRAIN_S = 5.0  # after the worker drained: in-flight Transfer calls end with their rooms


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


async def serve(
    config: PrefillServiceConfig, engine: LLMEngine, mesh: MeshOptions | None = None
) -> None:
    """Serve until SIGTERM/SIGINT: the bootstrap server first (decodes must reach it as soon as
    the router sends work), then the worker, registered (``--discovery consul``) with its
    bootstrap port in the meta. On shutdown it deregisters at once, the worker drains for the
    grace period, then every room left fails and the bootstrap server stops."""
    mesh = mesh or MeshOptions()
    async_engine = AsyncEngine(engine)
    async_engine.start()
    observed = Observed.start("pdmesh-prefill", config.host, mesh.telemetry)
    layout = engine.kv_layout()
    backend = get_backend(config.kv_transfer_backend)
    host = config.kv_transfer_host or config.host
    # the grpc backend dials decode workers' ports, which serve TLS when the mesh does
    # (mooncake's and cuda_ipc's transports have no TLS: see docs/architecture.md, Security)
    options: dict[str, object] = {"tls": mesh.tls} if backend.name == "grpc" else {}
    if backend.name in MOONCAKE_BACKENDS:
        options.update(
            protocol=config.kv_transfer_protocol, device_name=config.disaggregation_ib_device
        )
    sender = backend.sender.open(engine.runner.kv_cache, layout, host, **options)
    rooms = RoomTable(config.bootstrap_timeout)
    bootstrap = Bootstrap(rooms, DecodeRegistry(layout, sender.refusal))
    budget = OptimisticBudget(layout.num_pages, layout.page_size, config.optimistic_prefill_share)
    runner = PrefillRunner(
        async_engine, rooms, bootstrap.decodes, sender, config.transfer_timeout, budget
    )

    # counted but not traced: decodes ping it every few seconds, and a root span per ping
    # would bury the requests' traces
    boot_rpc = RpcServer(
        [BOOTSTRAP_SERVICE], interceptors=[observed.metrics.grpc_interceptor()], tls=mesh.tls
    )
    bootstrap_pb2_grpc.add_BootstrapServiceServicer_to_server(
        BootstrapServicer(bootstrap), boot_rpc.server
    )
    # SGLang's protocol beside ours
    rpc = RpcServer(
        [SERVICE_NAME, sglang_grpc.SERVICE_NAME], interceptors=observed.interceptors(), tls=mesh.tls
    )
    discovery = make_discovery(mesh.discovery)
    try:
        bootstrap_port = await boot_rpc.start(config.host, config.bootstrap_port)
        log.info("%s listening on %s:%d", BOOTSTRAP_SERVICE, config.host, bootstrap_port)
        model_info = convert.model_info_to_pb(engine, "prefill", bootstrap_port)
        servicer = PrefillServicer(async_engine, runner, rooms, model_info)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, rpc.server)
        sglang_grpc.add_to_server(rpc.server, servicer, async_engine, model_info)
        bound = await rpc.start(config.host, config.port)
        log.info(
            "%s (prefill, %s KV transfer) listening on %s:%d",
            SERVICE_NAME,
            describe(backend.name, sender.transport),
            config.host,
            bound,
        )
        meta = {
            META_MODEL: model_info.model_name,
            META_PAGE_SIZE: model_info.page_size,
            META_KV_BACKEND: backend.name,
            META_KV_PROTOCOL: sender.transport,
            META_IB_DEVICE: config.disaggregation_ib_device if sender.transport else None,
            META_BOOTSTRAP_PORT: bootstrap_port,
            **observed.meta(),
        }
        registration = registration_for(
            mesh.discovery,
            PREFILL,
            config.host,
            bound,
            (TAG_PREFILL,),
            meta,
            grpc_tls=mesh.tls.serves_tls,
        )
        try:
            async with registered(discovery, registration) as handle:
                sig = await wait_for_signal()
                log.info(
                    "%s received; deregistering, then draining in-flight calls for up to %.1fs",
                    sig.name,
                    config.grace_period,
                )
                await handle.deregister()
        finally:
            await rpc.stop(config.grace_period)
            rooms.fail_all(AbortedError("the prefill worker is shutting down"))
            await boot_rpc.stop(BOOTSTRAP_DRAIN_S)
            await discovery.close()
        log.info("stopped")
    finally:
        await sender.close()
        async_engine.shutdown()
        observed.close()
