"""gRPC plumbing shared by the services: ``server`` (a grpc.aio server with health, reflection,
error mapping and graceful shutdown) and ``errors`` (exceptions → status codes, once)."""

from pdmesh.rpc.errors import ERROR_DETAIL_KEY, ErrorInterceptor, error_detail, status_for
from pdmesh.rpc.server import RpcServer, configure_logging, serve_until_signal, wait_for_signal

__all__ = [
    "ERROR_DETAIL_KEY",
    "ErrorInterceptor",
    "RpcServer",
    "configure_logging",
    "error_detail",
    "serve_until_signal",
    "status_for",
    "wait_for_signal",
]
