"""Proto ↔ router values, for the router service's edge only: the admin RPCs' workers and
roles, and a generation's ``RouteRequest`` (what the routing core decides on) from the client's
message and back into each worker's request. The sampling parameters pass through untouched but
for the budgets a migration lowers."""

from __future__ import annotations

from collections.abc import Sequence

from pdmesh.errors import InvalidRequestError
from pdmesh.routing import RouteRequest
from pdmesh.v1 import common_pb2, router_pb2, worker_pb2
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


def route_request(
    request_id: str, prompt: Sequence[int], params: common_pb2.SamplingParams, deadline: float
) -> RouteRequest:
    """The routing core's view of a client's request: its ``prompt`` (token ids, once
    tokenized), its budgets (unset stays None) and ``deadline`` (event-loop time)."""
    return RouteRequest(
        request_id=request_id,
        prompt=prompt,
        max_new_tokens=params.max_new_tokens if params.HasField("max_new_tokens") else None,
        min_new_tokens=params.min_new_tokens if params.HasField("min_new_tokens") else None,
        deadline=deadline,
    )


def worker_request(
    request: RouteRequest, params: common_pb2.SamplingParams, attempt_id: str
) -> worker_pb2.GenerateRequest:
    """The worker's request for one attempt at ``request`` (known there as ``attempt_id``):
    ``params`` as the client sent them, with the budgets ``request`` has left (a migration
    lowers them; None leaves the field as it is)."""
    out = worker_pb2.GenerateRequest(
        request_id=attempt_id,
        token_ids=request.prompt,
        sampling_params=params,
        resumed_output_tokens=request.resumed_output_tokens,
    )
    if request.max_new_tokens is not None:
        out.sampling_params.max_new_tokens = request.max_new_tokens
    if request.min_new_tokens is not None:
        out.sampling_params.min_new_tokens = request.min_new_tokens
    return out
