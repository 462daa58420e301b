"""The request surface of the OpenAI endpoints, with no network: explicit nulls are "not given",
undeclared fields are a 400 naming them, and the structured-output and tool fields become the
router's fields (``response_format`` a JSON schema for the worker's constrained decoding)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from pdmesh.v1 import router_pb2
from services.gateway import convert
from services.gateway.errors import APIError, from_validation_error, in_body_terms
from services.gateway.native_schema import GenerateRequest
from services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def error_of(model: type[Any], body: dict[str, Any]) -> APIError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    errors = info.value.errors()
    return from_validation_error(
        RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors])
    )


def test_explicit_nulls_mean_not_given() -> None:
    body = chat(
        n=None,
        logprobs=None,
        stream=None,
        top_logprobs=None,
        temperature=None,
        tools=None,
        tool_choice=None,
        response_format=None,
        stream_options=None,
    )
    assert (body.n, body.logprobs, body.stream) == (1, False, False)
    (request,) = convert.chat_requests(body, "rid")
    assert not request.sampling_params.HasField("temperature")
    assert not request.HasField("tool_choice")
    done = CompletionRequest.model_validate({"model": "m", "prompt": "p", "echo": None, "n": None})
    assert (done.echo, done.n) == (False, 1)
    native = GenerateRequest.model_validate({"text": "x", "sampling_params": {"n": None}})
    assert native.sampling_params.n == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": MESSAGES, "functions": []}, "functions"),
        ({"model": "m", "messages": MESSAGES, "audio": {}}, "audio"),
        ({"model": "m", "messages": MESSAGES, "store": True}, "store"),
        ({"model": "m", "messages": MESSAGES, "modalities": ["audio"]}, "modalities[0]"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x", "colour": 1}]},
            "messages[0].colour",
        ),
        ({"model": "m", "messages": MESSAGES, "stream_options": {"x": 1}}, "stream_options.x"),
    ],
)
def test_unimplemented_fields_are_refused_by_name(body: dict[str, Any], param: str) -> None:
    error = error_of(ChatCompletionRequest, body)
    assert error.status == 400 and error.param == param, error.message


def test_native_and_completion_fields_refused_by_name() -> None:
    error = error_of(GenerateRequest, {"text": "x", "sampling_params": {"structural_tag": "t"}})
    assert error.param == "sampling_params.structural_tag"
    assert "unrecognized request argument" in error.message
    error = error_of(CompletionRequest, {"model": "m", "prompt": "p", "suffix": "s"})
    assert error.param == "suffix"
    error = error_of(CompletionRequest, {"model": "m", "prompt": "p", "best_of": 3})
    assert error.param == "best_of"


def test_accepted_no_op_fields() -> None:
    body = chat(
        user="u",
        metadata={"k": "v"},
        store=False,
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
    )
    assert convert.chat_requests(body, "rid")


def test_response_format_becomes_a_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }
    (request,) = convert.chat_requests(chat(response_format=fmt), "rid")
    assert json.loads(request.sampling_params.json_schema) == schema
    (request,) = convert.chat_requests(chat(response_format={"type": "json_object"}), "rid")
    assert json.loads(request.sampling_params.json_schema) == {"type": "object"}
    (request,) = convert.chat_requests(chat(response_format={"type": "text"}), "rid")
    assert not request.sampling_params.HasField("json_schema")
    error = error_of(
        ChatCompletionRequest,
        {"model": "m", "messages": MESSAGES, "response_format": {"type": "yaml"}},
    )
    assert error.param == "response_format", error.message


def test_native_grammar_fields_and_logit_bias_pass_through() -> None:
    body = GenerateRequest.model_validate(
        {"text": "x", "sampling_params": {"regex": "[ab]+", "logit_bias": {"7": -100}}}
    )
    (request,) = convert.native_requests(body, "rid")
    assert request.sampling_params.regex == "[ab]+"
    assert dict(request.sampling_params.logit_bias) == {7: -100.0}
    with pytest.raises(APIError) as info:
        convert.chat_requests(chat(logit_bias={"x": 1}), "rid")
    assert info.value.param == "logit_bias"
    error = error_of(
        ChatCompletionRequest, {"model": "m", "messages": MESSAGES, "logit_bias": {"5": 101}}
    )
    assert error.param == "logit_bias.5"


def test_tool_choice_becomes_the_routers_field() -> None:
    (request,) = convert.chat_requests(
        chat(tools=[WEATHER], tool_choice="required", parallel_tool_calls=False), "rid"
    )
    assert request.tool_choice.mode == router_pb2.TOOL_CHOICE_MODE_REQUIRED
    assert request.parallel_tool_calls is False
    assert json.loads(request.chat.tools_json)[0]["function"]["name"] == "get_weather"
    named = {"type": "function", "function": {"name": "get_weather"}}
    (request,) = convert.chat_requests(chat(tools=[WEATHER], tool_choice=named), "rid")
    assert request.tool_choice.function_name == "get_weather"
    with pytest.raises(APIError) as info:
        convert.chat_requests(
            chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
            "rid",
        )
    assert info.value.param == "tool_choice.function.name"
    with pytest.raises(APIError) as info:
        convert.chat_requests(chat(tool_choice="required"), "rid")
    assert info.value.param == "tool_choice"
    error = error_of(
        ChatCompletionRequest,
        {"model": "m", "messages": MESSAGES, "tools": [{"type": "function", "function": {}}]},
    )
    assert error.param == "tools[0].function.name"


@pytest.mark.parametrize(
    ("path", "wire", "body"),
    [
        ("/v1/chat/completions", "sampling_params.json_schema", "response_format"),
        ("/v1/chat/completions", "sampling_params.logit_bias", "logit_bias"),
        ("/v1/chat/completions", "sampling_params.max_new_tokens", "max_tokens"),
        ("/v1/responses", "sampling_params.json_schema", "text.format"),
        ("/v1/responses", "sampling_params.max_new_tokens", "max_output_tokens"),
        ("/v1/completions", "sampling_params.stop.0", "stop.0"),
        ("/generate", "sampling_params.json_schema", "sampling_params.json_schema"),
        ("/v1/chat/completions", "tool_choice", "tool_choice"),
        ("/v1/chat/completions", "chat.tools_json[1].function.name", "tools[1].function.name"),
    ],
)
def test_router_errors_name_the_field_of_the_body(path: str, wire: str, body: str) -> None:
    error = in_body_terms(APIError(400, f"{wire}: bad", param=wire, code="invalid_argument"), path)
    assert (error.status, error.param, error.code) == (400, body, "invalid_argument")


def test_responses_input_items_with_and_without_type() -> None:
    from services.gateway.responses_schema import (
        FunctionCallOutputItem,
        MessageItem,
        ResponsesRequest,
    )

    # the Agents SDK sends "easy" messages: role and content, no type
    body = ResponsesRequest.model_validate(
        {
            "model": "m",
            "input": [
                {"role": "user", "content": "hi"},
                {"type": "message", "role": "assistant", "content": "hello"},
                {"type": "function_call_output", "call_id": "c", "output": "ok"},
            ],
        }
    )
    assert isinstance(body.input, list)
    kinds = [type(item) for item in body.input]
    assert kinds == [MessageItem, MessageItem, FunctionCallOutputItem]
    error = error_of(ResponsesRequest, {"model": "m", "input": [{"type": "web_search_call"}]})
    assert error.status == 400 and error.param == "input[0]"
    error = error_of(ResponsesRequest, {"model": "m", "input": [{"role": "user"}]})
    assert error.param == "input[0].content"


def test_continue_final_message_leaves_the_last_message_open() -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    (request,) = convert.chat_requests(chat(messages=messages, continue_final_message=True), "r")
    assert request.chat.continue_final_message and not request.chat.add_generation_prompt
    # both true is the tokenizer's 400 (continue_final_message), not silently one of them
    both = chat(messages=messages, continue_final_message=True, add_generation_prompt=True)
    (request,) = convert.chat_requests(both, "r")
    assert request.chat.continue_final_message and request.chat.add_generation_prompt
    (plain,) = convert.chat_requests(chat(add_generation_prompt=False), "r")
    assert not plain.chat.add_generation_prompt and not plain.chat.HasField(
        "continue_final_message"
    )
