"""``Gateway``: what the routes share — the router client, the token-string look-up, the model
name — and the one way they turn router requests into pieces."""

from __future__ import annotations

import time
from collections.abc import Sequence

from starlette.requests import Request

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.v1 import router_pb2
from services.gateway.config import GatewayConfig
from services.gateway.errors import APIError
from services.gateway.inbox import Inbox
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
            config.routers if routers is None else routers,
            config.request_timeout,
            tls,
            stream=config.router_stream,
            migration_limit=config.migration_limit,
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

    def pieces(self, requests: Sequence[router_pb2.RouterGenerateRequest]) -> Inbox:
        """Start all ``requests`` (choice i = requests[i]); their pieces as they arrive."""
        return self.router.start(requests)

    async def close(self) -> None:
        await self.router.close()
        await self.texts.close()


def gateway_of(request: Request) -> Gateway:
    """The ``Gateway`` the app's lifespan made (``app.state.gateway``)."""
    gateway = request.app.state.gateway
    assert isinstance(gateway, Gateway)
    return gateway
