"""The router failures the gateway makes itself, as ``grpc.aio.AioRpcError``s: a request's
``RequestStatus`` from a shared ``Stream``, a broken stream, a local deadline, no router. Each is
exactly the error a per-request ``Generate`` call would have raised, so ``errors`` maps them to
the same HTTP status and OpenAI body.
"""

from __future__ import annotations

import grpc
import grpc.aio

from pdmesh.rpc.errors import ERROR_DETAIL_KEY
from pdmesh.v1 import common_pb2

_CODES = {code.value[0]: code for code in grpc.StatusCode}


def rpc_error(
    code: grpc.StatusCode, details: str, detail: common_pb2.ErrorDetail | None = None
) -> grpc.aio.AioRpcError:
    """The error a call ending with ``code``/``details`` (and the ``ErrorDetail`` trailer a
    pdmesh server attaches) raises."""
    trailing = grpc.aio.Metadata()
    if detail is not None:
        trailing = grpc.aio.Metadata((ERROR_DETAIL_KEY, detail.SerializeToString()))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=details)


def status_error(status: common_pb2.RequestStatus) -> grpc.aio.AioRpcError:
    """What the request's own Generate call would have raised."""
    code = _CODES.get(status.code, grpc.StatusCode.UNKNOWN)
    detail = status.detail if status.HasField("detail") else None
    return rpc_error(code, status.message, detail)


def unavailable(address: str, why: str) -> grpc.aio.AioRpcError:
    """A router that cannot be reached, or whose connection broke; the message names it."""
    return rpc_error(grpc.StatusCode.UNAVAILABLE, f"router {address}: {why}")


def no_router() -> grpc.aio.AioRpcError:
    return rpc_error(
        grpc.StatusCode.UNAVAILABLE, "no router is known (none registered in Consul yet?)"
    )


def deadline(timeout: float) -> grpc.aio.AioRpcError:
    # the gateway's own timer: the router keeps one too, but a hung router would not send it
    return rpc_error(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        f"Deadline Exceeded (--request-timeout {timeout:g} s)",
    )
