"""``Gateway``: what the routes share — the router client, the token-string look-up, the model
name — and the one way they turn router requests into pieces."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Sequence

from starlette.requests import Request

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.v1 import router_pb2
from services.gateway import convert
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError
from services.gateway.generation import Piece, merge
from services.gateway.router_client import RouterClient
from services.gateway.token_text import TokenTexts


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        routers: Sequence[str] | None = None,
        tls: TLSConfig = PLAINTEXT,
    ) -> None:
        """``routers``: the routers to start with; None: ``--router``'s. ``tls``: how the
        channels to the router and tokenizer are secured."""
        self.config = config
        self.router = RouterClient(
            config.routers if routers is None else routers, config.request_timeout, tls
        )
        self.texts = TokenTexts(config.tokenizer, tls)
        self.started = int(time.time())
        self._models: list[str] = [config.model_name] if config.model_name else []

    async def models(self) -> list[str]:
        """The served model names: --model-name, else what the router's workers report
        (asked until some router knows, then kept)."""
        if not self._models:
            self._models = await self.router.model_names()
        return self._models

    async def check_model(self, model: str) -> None:
        served = await self.models()
        # nothing known (no router answered): the router call will fail with its own error
        if served and model not in served:
            listed = ", ".join(served)
            raise APIError(
                404,
                f"model {model!r} is not served here; /v1/models lists {listed}",
                param="model",
                code="model_not_found",
            )

    def pieces(
        self, requests: Sequence[router_pb2.RouterGenerateRequest]
    ) -> AsyncGenerator[Piece, None]:
        """The pieces of all ``requests`` (choice i = requests[i]), as they arrive."""
        return merge([self._choice(i, r) for i, r in enumerate(requests)])

    async def _choice(
        self, index: int, request: router_pb2.RouterGenerateRequest
    ) -> AsyncGenerator[Piece, None]:
        async with contextlib.aclosing(self.router.generate(request)) as messages:
            async for message in messages:
                yield convert.piece_from_pb(index, message)

    async def close(self) -> None:
        await self.router.close()
        await self.texts.close()


def gateway_of(request: Request) -> Gateway:
    """The ``Gateway`` the app's lifespan made (``app.state.gateway``)."""
    gateway = request.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway
