"""``POST /tokenize`` and ``POST /detokenize`` (also at ``/v1/tokenize``, ``/v1/detokenize``,
where SGLang serves them too), in a shape both vLLM's and SGLang's clients read right:

    /tokenize   → {"count": n, "max_model_len": m, "tokens": [ids], "token_strs": [..] | null}
    /detokenize → {"prompt": text, "text": text}

``count``, ``max_model_len`` and ``tokens`` are what both answer; ``token_strs`` is vLLM's
(null unless ``return_token_strs``); ``prompt`` is vLLM's name for the decoded text and
``text`` SGLang's, so both are sent. An SGLang batch (``prompt`` a list of strings, ``tokens``
a list of lists) answers a list per field (``max_model_len`` stays one number). Requests are
``tokenize_schema``'s models; each text, chat or token list is one router call
(``RouterService.Tokenize`` / ``Detokenize``: the router's tokenizer service does the work, the
chat template included, exactly as for a generation's prompt). ``max_model_len`` is null
while no worker has answered the router.

Errors are OpenAI bodies naming the body's field: ids outside the vocabulary are a 400 naming
``tokens`` (``tokens[i]`` in a batch), a template's complaint about ``chat.tools_json`` names
``tools``, and so on. The model is checked when given, the API key by the middleware, and each
router call has a deadline (``RouterClient``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
import grpc.aio
from fastapi import APIRouter, Request

from pdmesh.rpc.errors import error_detail
from pdmesh.v1 import router_pb2
from services.gateway import convert
from services.gateway.errors import APIError, from_rpc_error
from services.gateway.openai_schema import MAX_CHOICES, ChatCompletionRequest
from services.gateway.state import gateway_of
from services.gateway.text_check import check_text
from services.gateway.tokenize_schema import DetokenizeRequest, TokenizeRequest

tokenization = APIRouter()

# one router call per prompt of a batch: as many as one generation request may make
MAX_BATCH = MAX_CHOICES
CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs")
# the router's (tokenizer service's) field names → the body's
_PARAMS = {
    "text": "prompt",
    "token_ids": "tokens",
    "chat.tools_json": "tools",
    "chat.template_kwargs_json": "chat_template_kwargs",
}


@tokenization.post("/tokenize")
@tokenization.post("/v1/tokenize", include_in_schema=False)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    if body.model is not None:
        await gateway.check_model(body.model)
    requests = tokenize_requests(body)
    replies = await _all(gateway.router.tokenize, requests)
    return tokenize_response(replies, isinstance(body.prompt, list), bool(body.return_token_strs))


@tokenization.post("/detokenize")
@tokenization.post("/v1/detokenize", include_in_schema=False)
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    gateway = gateway_of(request)
    if body.model is not None:
        await gateway.check_model(body.model)
    requests = detokenize_requests(body)
    replies = await _all(gateway.router.detokenize, requests)
    return detokenize_response(replies, is_batch(body))


def tokenize_requests(body: TokenizeRequest) -> list[router_pb2.RouterTokenizeRequest]:
    """One router request per text (a batch: several), or one for the chat."""
    check_text(body)
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "prompt: give exactly one of prompt and messages", param="prompt")
    strs = bool(body.return_token_strs)
    if body.messages is None:
        for name in CHAT_ONLY:
            if getattr(body, name) is not None:
                raise APIError(400, f"{name}: only goes with messages", param=name)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt or ())
        if not prompts:
            raise APIError(400, "prompt: must not be an empty list", param="prompt")
        _check_batch(len(prompts), "prompt")
        requests = [
            router_pb2.RouterTokenizeRequest(text=p, return_token_strs=strs) for p in prompts
        ]
    else:
        # the chat exactly as /v1/chat/completions sends it (the same conversion), so the
        # tokens are that request's prompt
        chat_body = ChatCompletionRequest(
            model=body.model or "",
            messages=body.messages,
            tools=body.tools,
            chat_template_kwargs=body.chat_template_kwargs,
            add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message,
        )
        chat = convert.chat_requests(chat_body, "tokenize")[0].chat
        requests = [router_pb2.RouterTokenizeRequest(chat=chat, return_token_strs=strs)]
    if body.add_special_tokens is not None:
        for r in requests:
            r.add_special_tokens = body.add_special_tokens
    return requests


def detokenize_requests(body: DetokenizeRequest) -> list[router_pb2.RouterDetokenizeRequest]:
    """One router request per token list. Special tokens are kept unless asked otherwise."""
    skip = bool(body.skip_special_tokens)
    lists: Sequence[Sequence[int]]
    if is_batch(body):
        lists = [t for t in body.tokens if isinstance(t, list)]
        _check_batch(len(lists), "tokens")
    else:
        lists = [[t for t in body.tokens if isinstance(t, int)]]
    return [
        router_pb2.RouterDetokenizeRequest(token_ids=ids, skip_special_tokens=skip) for ids in lists
    ]


def is_batch(body: DetokenizeRequest) -> bool:
    return bool(body.tokens) and isinstance(body.tokens[0], list)


def tokenize_response(
    replies: Sequence[router_pb2.RouterTokenizeResponse], batch: bool, token_strs: bool
) -> dict[str, Any]:
    tokens = [list(r.token_ids) for r in replies]
    strs = [list(r.token_strs) for r in replies] if token_strs else None
    lengths = [r.max_model_len for r in replies if r.HasField("max_model_len")]
    max_model_len = min(lengths) if lengths else None
    if batch:
        return {
            "count": [len(t) for t in tokens],
            "max_model_len": max_model_len,
            "tokens": tokens,
            "token_strs": strs,
        }
    return {
        "count": len(tokens[0]),
        "max_model_len": max_model_len,
        "tokens": tokens[0],
        "token_strs": strs[0] if strs is not None else None,
    }


def detokenize_response(
    replies: Sequence[router_pb2.RouterDetokenizeResponse], batch: bool
) -> dict[str, Any]:
    texts = [r.text for r in replies]
    text: str | list[str] = texts if batch else texts[0]
    return {"prompt": text, "text": text}


def _check_batch(size: int, field: str) -> None:
    if size > MAX_BATCH:
        raise APIError(400, f"{field}: at most {MAX_BATCH} in one request", param=field)


async def _all(call: Any, requests: Sequence[Any]) -> list[Any]:
    """Every request's reply, in order; the first failure (in request order) as the HTTP error
    naming the body's field."""
    results = await asyncio.gather(*(call(r) for r in requests), return_exceptions=True)
    for i, result in enumerate(results):
        if isinstance(result, grpc.aio.AioRpcError):
            raise router_error(result, i if len(requests) > 1 else None) from result
        if isinstance(result, BaseException):
            raise result
    return list(results)


def router_error(error: grpc.aio.AioRpcError, index: int | None) -> APIError:
    """``from_rpc_error``, with the router's field name turned into the body's (``token_ids``
    → ``tokens``, ``tokens[i]`` for entry ``i`` of a batch, ...)."""
    api = from_rpc_error(error)
    detail = error_detail(error)
    if error.code() != grpc.StatusCode.INVALID_ARGUMENT or detail is None or not detail.field:
        return api
    param = body_param(detail.field)
    if index is not None and param in ("prompt", "tokens"):
        param = f"{param}[{index}]"
    reason = detail.reason or api.message
    return APIError(400, f"{param}: {reason}", param=param, code=api.code)


def body_param(field: str) -> str:
    """A router/tokenizer field path as the request body's: ``chat.tools_json`` → ``tools``,
    ``messages[1].tool_calls_json`` → ``messages[1].tool_calls``."""
    if field in _PARAMS:
        return _PARAMS[field]
    field = field.removeprefix("chat.")
    return field.removesuffix("_json") if field.startswith("messages") else field
