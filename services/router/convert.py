"""Proto ↔ router values, for the router service's edge only (admin RPCs; the generation path
passes worker and tokenizer messages through and builds its own in ``generate``)."""

from __future__ import annotations

from pdmesh.errors import InvalidRequestError
from pdmesh.v1 import router_pb2
from services.router.workers import WorkerHandle

_ROLES: dict[int, str] = {
    router_pb2.WORKER_ROLE_UNSPECIFIED: "aggregated",  # the proto's documented default
    router_pb2.WORKER_ROLE_AGGREGATED: "aggregated",
    router_pb2.WORKER_ROLE_PREFILL: "prefill",
    router_pb2.WORKER_ROLE_DECODE: "decode",
}
_ROLES_PB = {
    "aggregated": router_pb2.WORKER_ROLE_AGGREGATED,
    "prefill": router_pb2.WORKER_ROLE_PREFILL,
    "decode": router_pb2.WORKER_ROLE_DECODE,
}


def role_from_pb(role: int) -> str:
    try:
        return _ROLES[role]
    except KeyError:
        raise InvalidRequestError("role", f"unknown worker role {role}") from None


def worker_to_pb(worker: WorkerHandle) -> router_pb2.Worker:
    return router_pb2.Worker(
        id=worker.id,
        address=worker.address,
        role=_ROLES_PB[worker.role],
        healthy=worker.healthy,
        model_name=worker.model_name,
        bootstrap_address=worker.bootstrap_address,
    )
