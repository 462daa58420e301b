"""``/tokenize`` and ``/detokenize`` with no network: the request models (vLLM's and SGLang's
shapes, undeclared fields a 400 naming them, nulls not given), the router requests they become,
the answers both clients read, and router errors naming the body's field."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from pdmesh.v1 import common_pb2, router_pb2
from services.gateway import tokenization
from services.gateway.errors import APIError, from_validation_error
from services.gateway.router_errors import rpc_error
from services.gateway.tokenize_schema import DetokenizeRequest, TokenizeRequest

MESSAGES = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "parameters": {"type": "object"}},
}


def tok(**fields: Any) -> TokenizeRequest:
    return TokenizeRequest.model_validate(fields)


def detok(**fields: Any) -> DetokenizeRequest:
    return DetokenizeRequest.model_validate(fields)


def validation_error(model: type[Any], body: dict[str, Any]) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    first = info.value.errors()[0]
    return from_validation_error(
        RequestValidationError([{**first, "loc": ("body", *first["loc"])}])
    )


def test_vllm_text_request() -> None:
    (request,) = tokenization.tokenize_requests(
        tok(model="m", prompt="Hello", add_special_tokens=False, return_token_strs=True)
    )
    assert request.text == "Hello"
    assert request.HasField("add_special_tokens") and not request.add_special_tokens
    assert request.return_token_strs


def test_defaults_are_left_to_the_router() -> None:
    # unset add_special_tokens: the router applies true for text, false for a chat
    (text,) = tokenization.tokenize_requests(tok(prompt="x", add_special_tokens=None))
    (chat,) = tokenization.tokenize_requests(tok(messages=MESSAGES, model=None))
    assert not text.HasField("add_special_tokens") and not chat.HasField("add_special_tokens")
    assert not chat.chat.HasField("add_generation_prompt")  # the tokenizer's default: true
    assert not text.return_token_strs


def test_sglang_batch_is_one_router_request_per_prompt() -> None:
    requests = tokenization.tokenize_requests(tok(prompt=["a", "b c"], add_special_tokens=True))
    assert [r.text for r in requests] == ["a", "b c"]
    assert all(r.add_special_tokens for r in requests)


def test_vllm_chat_request_is_the_chat_completions_chat() -> None:
    (request,) = tokenization.tokenize_requests(
        tok(
            messages=MESSAGES,
            add_generation_prompt=False,
            tools=[WEATHER],
            chat_template_kwargs={"enable_thinking": False},
            continue_final_message=False,
        )
    )
    chat = request.chat
    assert [(m.role, m.content) for m in chat.messages] == [("user", "hi")]
    assert chat.HasField("add_generation_prompt") and not chat.add_generation_prompt
    assert json.loads(chat.tools_json)[0]["function"]["name"] == "get_weather"
    assert json.loads(chat.template_kwargs_json) == {"enable_thinking": False}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "x", "messages": MESSAGES}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "x", "add_generation_prompt": True}, "add_generation_prompt"),
        ({"prompt": "x", "tools": [WEATHER]}, "tools"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"prompt": ["x"] * (tokenization.MAX_BATCH + 1)}, "prompt"),
    ],
)
def test_tokenize_body_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(APIError) as info:
        tokenization.tokenize_requests(tok(**body))
    assert (info.value.status, info.value.param) == (400, param)
    assert info.value.message.startswith(param)


@pytest.mark.parametrize(
    ("model", "body", "param"),
    [
        (TokenizeRequest, {"prompt": "x", "truncate_prompt_tokens": 3}, "truncate_prompt_tokens"),
        (TokenizeRequest, {"prompt": "x", "chat_template": "{{x}}"}, "chat_template"),
        (TokenizeRequest, {"messages": []}, "messages"),
        (TokenizeRequest, {"prompt": 5}, "prompt"),
        (DetokenizeRequest, {}, "tokens"),
        (DetokenizeRequest, {"tokens": [1, "a"]}, "tokens[1]"),
        (DetokenizeRequest, {"tokens": [1], "skip": True}, "skip"),
        (DetokenizeRequest, {"tokens": [2**31]}, "tokens[0]"),
    ],
)
def test_schema_refuses_naming_the_field(
    model: type[Any], body: dict[str, Any], param: str
) -> None:
    error = validation_error(model, body)
    assert error.status == 400
    assert error.param == param


def test_explicit_nulls_mean_not_given() -> None:
    body = tok(prompt="x", messages=None, return_token_strs=None, tools=None)
    assert body.messages is None and body.return_token_strs is None
    assert detok(tokens=[1], skip_special_tokens=None, model=None).skip_special_tokens is None


def test_detokenize_requests_keep_special_tokens_unless_asked() -> None:
    (one,) = tokenization.detokenize_requests(detok(tokens=[1, 2, 3]))
    assert list(one.token_ids) == [1, 2, 3]
    assert one.HasField("skip_special_tokens") and not one.skip_special_tokens
    batch = tokenization.detokenize_requests(detok(tokens=[[1], [2, 3]], skip_special_tokens=True))
    assert [list(r.token_ids) for r in batch] == [[1], [2, 3]]
    assert all(r.skip_special_tokens for r in batch)
    (empty,) = tokenization.detokenize_requests(detok(tokens=[]))
    assert list(empty.token_ids) == []


def test_tokenize_response_both_shapes() -> None:
    reply = router_pb2.RouterTokenizeResponse(token_ids=[5, 6], token_strs=["a", "Ġb"])
    reply.max_model_len = 2048
    assert tokenization.tokenize_response([reply], batch=False, token_strs=True) == {
        "count": 2,
        "max_model_len": 2048,
        "tokens": [5, 6],
        "token_strs": ["a", "Ġb"],
    }
    plain = tokenization.tokenize_response([reply], batch=False, token_strs=False)
    assert plain["token_strs"] is None
    other = router_pb2.RouterTokenizeResponse(token_ids=[7])
    other.max_model_len = 1024
    batch = tokenization.tokenize_response([reply, other], batch=True, token_strs=False)
    assert batch == {
        "count": [2, 1],
        "max_model_len": 1024,
        "tokens": [[5, 6], [7]],
        "token_strs": None,
    }
    unknown = tokenization.tokenize_response(
        [router_pb2.RouterTokenizeResponse()], batch=False, token_strs=False
    )
    assert unknown == {"count": 0, "max_model_len": None, "tokens": [], "token_strs": None}


def test_detokenize_response_answers_vllm_and_sglang_names() -> None:
    one = [router_pb2.RouterDetokenizeResponse(text="hi")]
    assert tokenization.detokenize_response(one, batch=False) == {"prompt": "hi", "text": "hi"}
    two = [*one, router_pb2.RouterDetokenizeResponse(text="yo")]
    assert tokenization.detokenize_response(two, batch=True) == {
        "prompt": ["hi", "yo"],
        "text": ["hi", "yo"],
    }


def _invalid(field: str, reason: str) -> grpc.aio.AioRpcError:
    detail = common_pb2.ErrorDetail(field=field, reason=reason)
    return rpc_error(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {reason}", detail)


def test_router_errors_name_the_body_field() -> None:
    vocab = "ids [99999] are outside the vocabulary [0, 49152)"
    error = tokenization.router_error(_invalid("token_ids", vocab), None)
    assert (error.status, error.param, error.message) == (400, "tokens", f"tokens: {vocab}")
    assert tokenization.router_error(_invalid("token_ids", vocab), 2).param == "tokens[2]"
    assert tokenization.router_error(_invalid("chat.tools_json", "bad"), None).param == "tools"
    kwargs = tokenization.router_error(_invalid("chat.template_kwargs_json", "bad"), None)
    assert kwargs.param == "chat_template_kwargs"
    calls = tokenization.router_error(_invalid("messages[1].tool_calls_json", "bad"), None)
    assert calls.param == "messages[1].tool_calls"
    assert tokenization.router_error(_invalid("messages[0].content", "x"), None).param == (
        "messages[0].content"
    )
    down = rpc_error(grpc.StatusCode.UNAVAILABLE, "tokenizer 127.0.0.1:1 failed")
    assert tokenization.router_error(down, None).status == 503
