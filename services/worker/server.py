"""The worker's entry coroutine, one for every role (``services.worker.roles``): the engine
started, the role's PD side opened, ``WorkerService`` and SGLang's scheduler protocol served
beside each other, registered in Consul while serving.

In ``--mode decode`` a request with ``disagg`` set gets its prompt's KV and first token from the
prefill named there; one without is prefilled here (the router's conditional disaggregation).
"""

from __future__ import annotations

from pdmesh.discovery import (
    META_MODEL,
    META_PAGE_SIZE,
    ServeHooks,
    make_discovery,
    registration_for,
    serve_registered,
)
from pdmesh.engine import AsyncEngine, LLMEngine
from pdmesh.engine.engine_process import EngineProcess
from pdmesh.rpc.server import RpcServer
from pdmesh.v1 import worker_pb2_grpc
from services.mesh import MeshOptions, Observed
from services.sglang_grpc import servicer as sglang_grpc
from services.worker import convert
from services.worker.config import PrefillServiceConfig, WorkerServiceConfig
from services.worker.roles import Role, role_for
from services.worker.servicer import SERVICE_NAME


async def serve(
    config: WorkerServiceConfig | PrefillServiceConfig,
    engine: LLMEngine | EngineProcess,
    mesh: MeshOptions | None = None,
    role: Role | None = None,
) -> None:
    """Serve ``engine`` until SIGTERM/SIGINT, registered (``--discovery consul``) while
    serving; on the signal it deregisters at once, then in-flight calls drain for the grace
    period (the engine keeps stepping meanwhile), then the role's side closes and the engine
    stops. ``role``: ``role_for(config)`` unless given."""
    mesh = mesh or MeshOptions()
    role = role or role_for(config)
    # with --engine-process the engine runs (already loaded) in a process of its own
    async_engine = engine if isinstance(engine, EngineProcess) else AsyncEngine(engine)
    async_engine.start()
    observed = Observed.start(role.telemetry_name, config.host, mesh.telemetry)
    names = [SERVICE_NAME, sglang_grpc.SERVICE_NAME, *role.service_names()]
    rpc = RpcServer(names, interceptors=observed.interceptors(), tls=mesh.tls)
    try:
        await role.open(async_engine, rpc, mesh.tls, observed.metrics)
        model_info = convert.model_info_to_pb(
            async_engine.info,
            role=role.name,
            bootstrap_port=role.bootstrap_port,
            migration_limit=role.migration_limit,
        )
        servicer = role.servicer(async_engine, model_info, observed.metrics)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(servicer, rpc.server)
        rpc.on_drain.append(servicer.drain)  # long-lived Stream calls end as the drain starts
        sglang_grpc.add_to_server(rpc.server, servicer, async_engine, model_info)
        meta = {
            META_MODEL: model_info.model_name,
            META_PAGE_SIZE: model_info.page_size,
            **role.meta(),
            **observed.meta(),
        }
        registration = registration_for(
            mesh.discovery,
            role.service,
            config.host,
            0,
            (role.tag,),
            meta,
            grpc_tls=mesh.tls.serves_tls,
        )
        hooks = ServeHooks(started=role.started, drained=role.drained)
        discovery = make_discovery(mesh.discovery)
        await serve_registered(
            rpc, config.host, config.port, config.grace_period, discovery, registration, hooks
        )
    finally:
        await role.close()
        async_engine.shutdown()
        observed.close()
