"""The SGLang router's worker-admin HTTP routes, forwarded to the router's admin gRPC:

    POST /add_worker?url=host:port[&role=aggregated|prefill|decode]  → AddWorker
    POST /remove_worker?url=host:port                                → RemoveWorker
    GET  /workers                                                    → ListWorkers

With several routers behind the gateway, a change goes to every one of them (each routes on
its own worker set) and ``/workers`` lists the union. The router validates the address (and
its scheme: ``sglang-grpc://host:port`` is a worker speaking SGLang's scheduler protocol). They need the API key when one is set
(``GatewayMiddleware``). A removed worker's in-flight requests run to completion on it (the
router closes its channel only after its request timeout); new requests no longer go there.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import grpc
import grpc.aio
from fastapi import APIRouter, Query, Request

from pdmesh.rpc.errors import error_detail
from pdmesh.v1 import router_pb2
from services.gateway.errors import APIError
from services.gateway.state import gateway_of

admin = APIRouter()

Role = Literal["aggregated", "prefill", "decode"]
ROLES_PB: dict[str, router_pb2.WorkerRole] = {
    "aggregated": router_pb2.WORKER_ROLE_AGGREGATED,
    "prefill": router_pb2.WORKER_ROLE_PREFILL,
    "decode": router_pb2.WORKER_ROLE_DECODE,
}
ROLE_NAMES = {v: k for k, v in ROLES_PB.items()}
GRPC_SCHEME = "grpc://"  # a pdmesh worker's url may say it speaks gRPC; its address does not


@admin.post("/add_worker")
async def add_worker(
    request: Request,
    url: Annotated[str, Query(description="host:port of the worker's gRPC service")],
    role: Annotated[Role, Query(description="what the worker does in the mesh")] = "aggregated",
) -> dict[str, Any]:
    address = worker_address(url)
    try:
        worker = await gateway_of(request).router.add_worker(address, ROLES_PB[role])
    except grpc.aio.AioRpcError as e:
        raise _url_error(e) from e
    return {
        "status": "ok",
        "message": f"Successfully added worker: {address}",
        "worker": worker_json(worker),
    }


@admin.post("/remove_worker")
async def remove_worker(
    request: Request,
    url: Annotated[str, Query(description="host:port of the worker to remove")],
) -> dict[str, Any]:
    address = worker_address(url)
    if not await gateway_of(request).router.remove_worker(address):
        raise APIError(404, f"no worker at {address} is registered", "url", "worker_not_found")
    return {"status": "ok", "message": f"Successfully removed worker: {address}"}


@admin.get("/workers")
async def list_workers(request: Request) -> dict[str, Any]:
    workers = [worker_json(w) for w in await gateway_of(request).router.list_workers()]
    return {"workers": workers, "total": len(workers)}


def worker_address(url: str) -> str:
    """``url`` as the router's worker address: host:port (``grpc://`` and a trailing ``/``
    dropped); another scheme stays for the router to accept (``sglang-grpc://``) or refuse."""
    address = url.strip().removeprefix(GRPC_SCHEME).rstrip("/")
    host, _, port = address.rpartition("://")[2].rpartition(":")
    if not host or not port.isdigit():
        raise APIError(400, f"url: {url!r} is not host:port", "url")
    return address


def _url_error(error: grpc.aio.AioRpcError) -> Exception:
    """The router's complaint about the worker's ``address`` is about this route's ``url``."""
    detail = error_detail(error)
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT and detail and detail.field == "address":
        return APIError(400, f"url: {detail.reason}", "url")
    return error


def worker_json(worker: router_pb2.Worker) -> dict[str, Any]:
    return {
        "id": worker.id,
        "url": worker.address,
        "role": ROLE_NAMES.get(worker.role, "aggregated"),
        "healthy": worker.healthy,
        "model": worker.model_name,
        "bootstrap_address": worker.bootstrap_address or None,
    }
