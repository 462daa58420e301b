"""The ASGI app: FastAPI with the gateway's routes, its exception handlers, and the
request-id / API-key / body-limit middleware around it.

Errors are handled once, here: ``APIError`` answers as it is, pydantic's validation errors and
router failures (``AioRpcError``, in-band ``GenerationError``) are mapped in ``errors``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc.aio
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from services.gateway import errors
from services.gateway.config import GatewayConfig
from services.gateway.generation import GenerationError
from services.gateway.middleware import GatewayMiddleware
from services.gateway.routes import router
from services.gateway.state import Gateway


def create_app(config: GatewayConfig) -> GatewayMiddleware:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # grpc.aio channels belong to the loop that makes them: uvicorn's, so made here
        app.state.gateway = Gateway(config)
        try:
            yield
        finally:
            await app.state.gateway.close()

    app = FastAPI(
        title="pdmesh gateway",
        summary="OpenAI-compatible and SGLang-native HTTP API over the pdmesh router",
        lifespan=lifespan,
    )
    app.add_exception_handler(errors.APIError, errors.api_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(HTTPException, errors.http_error_handler)
    app.add_exception_handler(grpc.aio.AioRpcError, errors.router_error_handler)
    app.add_exception_handler(GenerationError, errors.router_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)
    app.include_router(router)
    return GatewayMiddleware(app, config.api_key, config.max_body_bytes)
