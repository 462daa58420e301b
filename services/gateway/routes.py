"""The HTTP routes. Each generation route: check the body (pydantic did the field bounds;
``convert`` the rest) → one router request per choice → stream the pieces as SSE, or collect
them into one JSON body."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from services.gateway import convert, native_format, openai_format, responses_api, sse, streams
from services.gateway.disconnect import unless_disconnected
from services.gateway.errors import APIError
from services.gateway.generation import ChoiceResult, collect, total_usage
from services.gateway.native_schema import GenerateRequest
from services.gateway.openai_format import ResponseMeta
from services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest
from services.gateway.responses_schema import ResponsesRequest
from services.gateway.state import Gateway, gateway_of
from services.gateway.streams import Pieces, StreamShape

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    gateway, request_id = gateway_of(request), _request_id(request)
    await gateway.check_model(body.model)
    requests = convert.chat_requests(body, request_id)
    meta = ResponseMeta(f"chatcmpl-{request_id}", body.model, int(time.time()))
    pieces = gateway.pieces(requests)
    if body.stream:
        shape = StreamShape(len(requests), body.n, body.include_usage, body.logprobs)
        first = await _first_piece(request, pieces)
        events = streams.chat_events(meta, first, shape, gateway.texts, encoded=True)
        return sse.response(events, first)
    results = await _all_pieces(request, pieces, len(requests))
    texts = await _token_texts(gateway, results, body.logprobs)
    usage = total_usage(results, body.n)
    return JSONResponse(openai_format.chat_completion(meta, results, usage, texts, body.logprobs))


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    gateway, request_id = gateway_of(request), _request_id(request)
    await gateway.check_model(body.model)
    requests = convert.completion_requests(body, request_id)
    meta = ResponseMeta(f"cmpl-{request_id}", body.model, int(time.time()))
    logprobs = body.logprobs is not None
    pieces = gateway.pieces(requests)
    if body.stream:
        shape = StreamShape(len(requests), body.n, body.include_usage, logprobs)
        first = await _first_piece(request, pieces)
        events = streams.completion_events(meta, first, shape, gateway.texts, encoded=True)
        return sse.response(events, first)
    results = await _all_pieces(request, pieces, len(requests))
    texts = await _token_texts(gateway, results, logprobs)
    usage = total_usage(results, body.n)
    return JSONResponse(openai_format.completion(meta, results, usage, texts, logprobs))


@router.post("/v1/responses")
async def responses(body: ResponsesRequest, request: Request) -> Response:
    """OpenAI's Responses API, stateless: one choice of a chat request, as output items."""
    gateway, request_id = gateway_of(request), _request_id(request)
    await gateway.check_model(body.model)
    chat = responses_api.chat_request(body)
    requests = convert.chat_requests(chat, request_id)
    meta = responses_api.ResponseMeta(
        f"resp_{request_id}", body.model, int(time.time()), responses_api.echoed_settings(body)
    )
    builder = responses_api.ResponseBuilder(meta)
    pieces = gateway.pieces(requests)
    if body.stream:
        first = await _first_piece(request, pieces)
        return sse.response(responses_api.response_events(builder, first), first)
    result = await unless_disconnected(request, responses_api.collect_response(builder, pieces))
    return JSONResponse(result)


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request) -> Response:
    """SGLang's native API: one body for a single prompt with n=1, else a list."""
    gateway, start = gateway_of(request), time.monotonic()
    requests = convert.native_requests(body, _request_id(request))
    request_ids = [r.request_id for r in requests]
    logprobs = body.return_logprob
    pieces = gateway.pieces(requests)
    if body.stream:
        first = await _first_piece(request, pieces)
        events = streams.native_events(first, request_ids, start, logprobs, gateway.texts)
        return sse.response(events, first)
    results = await _all_pieces(request, pieces, len(requests))
    latency = time.monotonic() - start
    texts = await _token_texts(gateway, results, logprobs) if logprobs else None
    bodies = [
        native_format.generate_result(r, request_ids[r.index], latency, texts) for r in results
    ]
    single = len(bodies) == 1 and not _is_batch(body)
    return JSONResponse(bodies[0] if single else bodies)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    names = await gateway.models()
    return {"object": "list", "data": [openai_format.model_card(n, gateway.started) for n in names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    await gateway.check_model(model)
    return openai_format.model_card(model, gateway.started)


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    """200 when a router answers its health check, 503 otherwise (for load balancers)."""
    if not await gateway_of(request).router.healthy():
        raise APIError(503, "no router is serving", code="unavailable")
    return {"status": "ok"}


async def _first_piece(request: Request, pieces: Pieces) -> Pieces:
    """The stream, once its first piece is in (so errors before it get a proper status)."""
    return await unless_disconnected(request, sse.peek(pieces))


async def _all_pieces(request: Request, pieces: Pieces, num_choices: int) -> list[ChoiceResult]:
    return await unless_disconnected(request, collect(pieces, num_choices))


def _request_id(request: Request) -> str:
    return str(request.state.request_id)  # set by GatewayMiddleware for every request


async def _token_texts(
    gateway: Gateway, results: Sequence[ChoiceResult], enabled: bool
) -> Mapping[int, str]:
    if not enabled:
        return {}
    return await gateway.texts.lookup(streams.token_ids([lp for r in results for lp in r.logprobs]))


def _is_batch(body: GenerateRequest) -> bool:
    if body.sampling_params.n > 1 or isinstance(body.text, list):
        return True
    ids = body.input_ids
    return ids is not None and len(ids) > 0 and isinstance(ids[0], list)
