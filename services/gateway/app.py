"""The ASGI app: FastAPI with the gateway's routes (the API, and the SGLang router's worker-admin
routes), its exception handlers, and the request-id / API-key / body-limit middleware around
it; around that CORS (``--cors-allowed-origins``: a browser's preflight carries no API key, so
it is answered before the key is checked); outermost the HTTP request span
(``TracingMiddleware``) and the request metrics, with ``/metrics`` served beside the API.
While serving, the gateway is registered in Consul (HTTP check on ``/health``) and follows the
catalog's routers (``--discovery consul``).

Errors are handled once, here: ``APIError`` answers as it is, pydantic's validation errors and
router failures (``AioRpcError``, in-band ``GenerationError``) are mapped in ``errors``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc.aio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp

from pdmesh.discovery import (
    GATEWAY,
    META_METRICS_PORT,
    ROUTER,
    DiscoveryConfig,
    diffing,
    make_discovery,
    registered,
    registration_for,
)
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import Metrics, TracingMiddleware, setup_tracing, start_metrics_server
from services.gateway import errors
from services.gateway.admin import admin
from services.gateway.client_streams import ClientStreams
from services.gateway.config import GatewayConfig
from services.gateway.generation import GenerationError
from services.gateway.middleware import REQUEST_ID_HEADER, GatewayMiddleware
from services.gateway.routes import router
from services.gateway.state import Gateway
from services.gateway.tokenization import tokenization

# FastAPI >= 0.16x traces and meters requests by itself once an OTel provider is installed:
# a second HTTP span per request (beside TracingMiddleware's) and spans for dependency
# resolution. pdmesh keeps one span per hop and its own Prometheus metrics, so that is off.
_NO_NATIVE_TELEMETRY: dict[str, Any] = (
    {
        "telemetry": {
            "tracing": False,
            "metrics": False,
            "logs": False,
            "operation_spans": False,
            "auto_configure": False,
        }
    }
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def create_app(
    config: GatewayConfig,
    discovery_config: DiscoveryConfig | None = None,
    tls: TLSConfig = PLAINTEXT,
    worker: int | None = None,
) -> ASGIApp:
    """``tls``: how the gateway's gRPC channels (router, tokenizer) are secured; the HTTP side
    is plain HTTP (terminate TLS in front of it). ``worker``: this process's index among
    ``--workers`` (which share the HTTP port), None for a gateway of one process."""
    discovery_config = discovery_config or DiscoveryConfig()
    consul = discovery_config.discovery == "consul"
    setup_tracing("pdmesh-gateway")
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # grpc.aio channels belong to the loop that makes them: uvicorn's, so made here.
        # Under Consul the routers are the catalog's; --router (which has a default) is static's
        gateway = Gateway(config, routers=() if consul else None, tls=tls)
        app.state.gateway = gateway
        discovery = make_discovery(discovery_config)
        if consul:
            discovery.watch(
                ROUTER,
                None,
                diffing(
                    lambda e: gateway.router.add(e.target),
                    lambda e: gateway.router.remove(e.target),
                ),
            )
        # /metrics is on the API's own port; Consul checks GET /health
        metrics_port, metrics_server = config.port, None
        if worker is not None and consul:
            # processes sharing the port: Prometheus must reach each one, not whichever takes
            # the connection, so each serves /metrics on a port of its own too
            metrics_server = start_metrics_server(metrics, config.host, 0)
            assert metrics_server is not None
            metrics_port = metrics_server.port
        registration = registration_for(
            discovery_config,
            GATEWAY,
            config.host,
            config.port,
            meta={META_METRICS_PORT: metrics_port},
            check="http",
        )
        if worker is not None:  # one registration per process
            registration = dataclasses.replace(
                registration, id=f"{registration.service_id}-{worker}"
            )
        try:
            async with registered(discovery, registration):
                yield
        finally:
            await discovery.close()
            await gateway.close()
            if metrics_server is not None:
                metrics_server.close()

    app = FastAPI(
        title="pdmesh gateway",
        summary="OpenAI-compatible and SGLang-native HTTP API over the pdmesh router",
        lifespan=lifespan,
        **_NO_NATIVE_TELEMETRY,
    )
    app.add_exception_handler(errors.APIError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(HTTPException, errors.http_error_handler)
    app.add_exception_handler(grpc.aio.AioRpcError, errors.router_error_handler)
    app.add_exception_handler(GenerationError, errors.router_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)
    app.include_router(router)
    app.include_router(admin)
    app.include_router(tokenization)
    # a route, not a mount (which would redirect /metrics to /metrics/)
    app.add_route("/metrics", metrics.endpoint, include_in_schema=False)
    guarded: ASGIApp = GatewayMiddleware(
        app,
        config.api_keys(),
        config.max_body_bytes,
        config.request_id_header_names,
        ClientStreams(config.max_streams_per_client),
    )
    if config.cors_origins:
        guarded = CORSMiddleware(
            guarded,
            allow_origins=config.cors_origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["*"],  # Authorization, Content-Type, the request-id headers...
            expose_headers=[REQUEST_ID_HEADER],
        )
    # the span outermost, so rejected requests (401, 413) are traced and counted too
    return TracingMiddleware(metrics.asgi_middleware(guarded))
