"""Pure-ASGI middleware for what every request goes through: its id (from the first of
``--request-id-headers`` present, echoed as ``x-request-id``), the API key (``APIKeys``), the
body size limit, and the limit on open generation requests per client (``ClientStreams``).

Pure ASGI rather than Starlette's ``BaseHTTPMiddleware``, which runs the endpoint in a task
of its own and so would hide the client's disconnect from streamed responses.
"""

from __future__ import annotations

import logging
import re
import uuid

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.gateway.api_keys import APIKeys
from services.gateway.client_streams import ClientStreams, client_id
from services.gateway.config import DEFAULT_REQUEST_ID_HEADERS
from services.gateway.errors import APIError, BodyTooLargeError

log = logging.getLogger(__name__)

# probes and Prometheus carry no key (metrics are counts and latencies, no request content)
OPEN_PATHS = frozenset({"/health", "/metrics"})
# the routes that hold router and worker capacity while open (--max-streams-per-client)
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate"})
REQUEST_ID_HEADER = "x-request-id"
# ids travel into logs and the worker's request table: keep them short and printable
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        api_keys: APIKeys,
        max_body_bytes: int,
        request_id_headers: tuple[str, ...] = DEFAULT_REQUEST_ID_HEADERS,
        streams: ClientStreams | None = None,
    ) -> None:
        """``api_keys``: none means an open API; ``request_id_headers``: lower-case names, the
        first one present wins; ``streams``: the per-client limit (None: no limit)."""
        self.app = app
        self.api_keys = api_keys
        self.max_body_bytes = max_body_bytes
        self.request_id_headers = request_id_headers
        self.streams = streams or ClientStreams(0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = _request_id(headers, self.request_id_headers)
        scope.setdefault("state", {})["request_id"] = request_id
        send = _with_header(send, REQUEST_ID_HEADER, request_id)
        key_index: int | None = None
        if self.api_keys and scope["path"] not in OPEN_PATHS:
            key_index = self.api_keys.match(headers.get("authorization", ""))
            if key_index is None:
                denied = APIError(401, "invalid or missing API key", code="invalid_api_key")
                await denied.response()(scope, receive, send)
                return
        if too_large := self._too_large(headers):
            await too_large.response()(scope, receive, send)
            return
        if not self.streams or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, self._limited(receive), send)
            return
        client = client_id(key_index, (scope.get("client") or (None,))[0])
        if not self.streams.try_open(client):
            log.info("request %s: %s has %d requests open", request_id, client, self.streams.limit)
            limit = self.streams.limit
            message = f"too many concurrent requests from this client: at most {limit} at a time"
            await APIError(429, message, code="too_many_streams").response()(scope, receive, send)
            return
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.streams.close(client)

    def _too_large(self, headers: Headers) -> APIError | None:
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            limit = self.max_body_bytes
            message = f"request body of {length} bytes exceeds the {limit}-byte limit"
            return APIError(413, message, code="request_too_large")
        return None

    def _limited(self, receive: Receive) -> Receive:
        """``receive`` that fails once the body passes the limit (chunked bodies carry no
        Content-Length to check up front)."""
        seen = 0

        async def receive_limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        return receive_limited


def _request_id(headers: Headers, names: tuple[str, ...]) -> str:
    """The first valid id among the ``names`` headers, else a new one."""
    for name in names:
        given = headers.get(name)
        if given and VALID_REQUEST_ID.fullmatch(given):
            return given
    return uuid.uuid4().hex


def _with_header(send: Send, name: str, value: str) -> Send:
    raw = (name.encode("latin-1"), value.encode("latin-1"))

    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), raw]}
        await send(message)

    return send_with_header
