"""The part of SGLang's native HTTP API that ``sglang-router`` needs from a worker, over any
token-id generator: the echo worker answers from memory, the shim from a pdmesh worker.

Routes (what sglang-router 0.3.2 calls when it registers a worker, then per request):
``GET /health`` (and ``/health_generate``), ``GET /model_info`` and ``/server_info`` (also
under their older ``/get_*`` names), ``GET /get_load``, ``GET /v1/models`` and
``POST /generate`` with ``input_ids`` only. ``/generate`` answers SGLang's shape:
``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency"}}``; with ``"stream": true`` it is
server-sent events, each carrying the output so far, then ``data: [DONE]``. ``text`` is always
empty: like an SGLang server started with ``--skip-tokenizer-init``, nothing here has a
tokenizer. A body it cannot serve gets 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

log = logging.getLogger(__name__)

# what a backend here honours; "detokenize" (pdmesh's: ids only) is accepted and moot, since
# nothing here detokenizes, so one body serves every arm of a benchmark
SAMPLING_KEYS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "temperature",
        "top_p",
        "top_k",
        "ignore_eos",
        "detokenize",
    }
)


@dataclass(frozen=True)
class Chunk:
    """Tokens produced since the previous chunk; ``finish_reason`` set on the last one."""

    token_ids: tuple[int, ...]
    finish_reason: str | None = None  # "length" | "stop" | "abort" | "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    error: str = ""


class GenerateError(Exception):
    """The request could not be served; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Backend(Protocol):
    """What serves the routes: model facts, load and token-id generation."""

    model_name: str
    # names the serving worker in every reply's meta_info ("pdmesh_worker"), so a benchmark
    # learns where a router sent each request; "" leaves it out
    worker_id: str

    async def load(self) -> dict[str, Any]: ...

    def generate(
        self, request_id: str, input_ids: list[int], sampling: dict[str, Any]
    ) -> AsyncIterator[Chunk]: ...


def make_app(backend: Backend) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    handlers = _Handlers(backend)
    for path in ("/health", "/health_generate"):
        app.router.add_get(path, handlers.health)
    for path in ("/model_info", "/get_model_info"):
        app.router.add_get(path, handlers.model_info)
    for path in ("/server_info", "/get_server_info"):
        app.router.add_get(path, handlers.server_info)
    for path in ("/get_load", "/get_loads"):
        app.router.add_get(path, handlers.get_load)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_post("/generate", handlers.generate)
    return app


def bound_port(runner: web.AppRunner, asked: int) -> int:
    """The port ``runner``'s site actually listens on (``asked`` unless it was 0)."""
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return asked


def quiet_http_logs() -> None:
    """sglang-router first probes a worker for gRPC (an HTTP/2 preface); aiohttp logs the
    refused preface with a traceback. It is expected: keep those out of the log."""
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class _Handlers:
    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._started = int(time.time())

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def model_info(self, request: web.Request) -> web.Response:
        name = self._backend.model_name
        return web.json_response(
            {"model_path": name, "tokenizer_path": None, "is_generation": True}
        )

    async def server_info(self, request: web.Request) -> web.Response:
        name = self._backend.model_name
        return web.json_response(
            {"model_path": name, "served_model_name": name, "skip_tokenizer_init": True}
        )

    async def get_load(self, request: web.Request) -> web.Response:
        return web.json_response(await self._backend.load())

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self._backend.model_name, "object": "model", "created": self._started}
        return web.json_response({"object": "list", "data": [card]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        start = time.monotonic()
        try:
            body = await request.json()
            input_ids, sampling, rid, stream = _parse(body)
        except (ValueError, GenerateError) as e:
            return _error(400, str(e.message if isinstance(e, GenerateError) else e))
        chunks = self._backend.generate(rid, input_ids, sampling)
        if stream:
            return await self._stream(request, chunks, rid, start)
        result = _Result(rid, self._backend.worker_id)
        try:
            async for chunk in chunks:
                result.add(chunk)
        except GenerateError as e:
            return _error(e.status, e.message)
        if result.error:
            return _error(500, result.error)
        return web.json_response(result.body(time.monotonic() - start))

    async def _stream(
        self,
        request: web.Request,
        chunks: AsyncIterator[Chunk],
        rid: str,
        start: float,
    ) -> web.StreamResponse:
        result = _Result(rid, self._backend.worker_id)
        try:
            first = await anext(chunks)  # errors before the first token get a status
        except StopAsyncIteration:
            return _error(500, "the backend ended without a finish reason")
        except GenerateError as e:
            return _error(e.status, e.message)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk: Chunk | None = first
        while chunk is not None:
            result.add(chunk)
            event = result.body(time.monotonic() - start)
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                chunk = None
            except GenerateError as e:
                err = {"error": {"message": e.message, "code": e.status}}
                await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


class _Result:
    """The output so far, as SGLang's /generate body."""

    def __init__(self, rid: str, worker_id: str) -> None:
        self.rid = rid
        self.worker_id = worker_id
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.error = ""

    def add(self, chunk: Chunk) -> None:
        self.output_ids.extend(chunk.token_ids)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.prompt_tokens = chunk.prompt_tokens
            self.cached_tokens = chunk.cached_tokens
            self.error = chunk.error

    def body(self, latency_s: float) -> dict[str, Any]:
        reason: dict[str, Any] | None = None
        if self.finish_reason == "length":
            reason = {"type": "length", "length": len(self.output_ids)}
        elif self.finish_reason is not None:
            matched = self.output_ids[-1] if self.output_ids else None
            reason = {"type": self.finish_reason, "matched": matched}
        meta = {
            "id": self.rid,
            "finish_reason": reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": self.cached_tokens,
            "e2e_latency": round(latency_s, 6),
        }
        if self.worker_id:
            meta["pdmesh_worker"] = self.worker_id
        return {"text": "", "output_ids": list(self.output_ids), "meta_info": meta}


def _parse(body: Any) -> tuple[list[int], dict[str, Any], str, bool]:
    """(input_ids, sampling params, request id, stream) of a /generate body."""
    if not isinstance(body, dict):
        raise GenerateError(400, "the body must be a JSON object")
    if body.get("text") is not None:
        raise GenerateError(400, "text prompts need a tokenizer: send input_ids")
    ids = body.get("input_ids")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
        raise GenerateError(400, "input_ids must be a non-empty list of ints (one prompt)")
    sampling = body.get("sampling_params") or {}
    if not isinstance(sampling, dict):
        raise GenerateError(400, "sampling_params must be an object")
    unknown = sorted(k for k, v in sampling.items() if v is not None and k not in SAMPLING_KEYS)
    if unknown:
        raise GenerateError(400, f"unsupported sampling_params: {', '.join(unknown)}")
    rid = body.get("rid") or f"gen-{time.monotonic_ns():x}"
    return ids, sampling, str(rid), bool(body.get("stream", False))


def _error(status: int, message: str) -> web.Response:
    err = {"message": message, "type": "invalid_request_error", "param": None, "code": status}
    return web.json_response({"error": err}, status=status)
