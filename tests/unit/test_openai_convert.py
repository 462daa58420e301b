"""The gateway's conversions at its edges, with no network: HTTP bodies → router protos
(explicit presence, n/seed fan-out, prompt shapes), router messages → pieces, and errors →
OpenAI bodies."""

from __future__ import annotations

import json
from typing import Any

import grpc
import grpc.aio
import pytest
from fastapi.exceptions import RequestValidationError

from pdmesh.rpc.errors import ERROR_DETAIL_KEY
from pdmesh.v1 import common_pb2, router_pb2
from services.gateway import convert
from services.gateway.errors import APIError, from_rpc_error, from_validation_error
from services.gateway.generation import GenerationError, Usage
from services.gateway.native_schema import GenerateRequest
from services.gateway.openai_schema import ChatCompletionRequest, CompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": MESSAGES, **fields})


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "p", **fields})


def test_unset_sampling_fields_stay_unset() -> None:
    (request,) = convert.chat_requests(chat(), "rid")
    params = request.sampling_params
    for name in ("temperature", "top_p", "max_new_tokens", "seed", "logprobs", "ignore_eos"):
        assert not params.HasField(name), name
    assert request.request_id == "rid"
    assert request.WhichOneof("input") == "chat"
    assert [m.content for m in request.chat.messages] == ["hi"]


def test_zero_values_are_sent_as_given() -> None:
    (request,) = convert.chat_requests(chat(temperature=0, max_tokens=0), "rid")
    assert request.sampling_params.HasField("temperature")
    assert request.sampling_params.temperature == 0
    assert request.sampling_params.max_new_tokens == 0


def test_max_completion_tokens_wins_and_extras_pass_through() -> None:
    body = chat(max_tokens=5, max_completion_tokens=9, top_k=4, min_p=0.1, ignore_eos=True)
    params = convert.chat_requests(body, "rid")[0].sampling_params
    assert params.max_new_tokens == 9
    assert (params.top_k, params.ignore_eos) == (4, True)
    assert params.min_p == pytest.approx(0.1)


def test_n_fans_out_with_seed_plus_index_and_unique_ids() -> None:
    requests = convert.chat_requests(chat(n=3, seed=5), "rid")
    assert [r.sampling_params.seed for r in requests] == [5, 6, 7]
    assert [r.request_id for r in requests] == ["rid-0", "rid-1", "rid-2"]
    wrapped = convert.chat_requests(chat(n=2, seed=2**64 - 1), "rid")
    assert [r.sampling_params.seed for r in wrapped] == [2**64 - 1, 0]
    unseeded = convert.chat_requests(chat(n=2), "rid")
    assert not any(r.sampling_params.HasField("seed") for r in unseeded)


def test_chat_logprobs_and_tools() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = chat(logprobs=True, top_logprobs=3, tools=[tool])
    (request,) = convert.chat_requests(body, "rid")
    assert request.sampling_params.logprobs and request.sampling_params.top_logprobs == 3
    assert json.loads(request.chat.tools_json) == [tool]
    with pytest.raises(APIError) as caught:
        convert.chat_requests(chat(top_logprobs=2), "rid")
    assert caught.value.status == 400 and caught.value.param == "top_logprobs"


def test_multi_part_content_is_joined() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    body = chat(messages=[{"role": "user", "content": parts}])
    assert convert.chat_requests(body, "rid")[0].chat.messages[0].content == "a\nb"


@pytest.mark.parametrize(
    ("prompt", "kinds"),
    [
        ("text", ["text"]),
        (["a", "b"], ["text", "text"]),
        ([1, 2, 3], ["token_ids"]),
        ([[1, 2], [3]], ["token_ids", "token_ids"]),
    ],
)
def test_prompt_shapes(prompt: Any, kinds: list[str]) -> None:
    requests = convert.completion_requests(completion(prompt=prompt, n=2), "rid")
    assert [r.WhichOneof("input") for r in requests] == [k for k in kinds for _ in range(2)]
    assert [r.request_id for r in requests] == [f"rid-{i}" for i in range(2 * len(kinds))]


def test_bad_prompts_and_stops_are_400() -> None:
    for body in (
        completion(prompt=[]),
        completion(stop=""),
        completion(stop=["x"] * 17),
        completion(echo=True),
    ):
        with pytest.raises(APIError) as caught:
            convert.completion_requests(body, "rid")
        assert caught.value.status == 400


def test_stop_string_or_list() -> None:
    assert list(
        convert.completion_requests(completion(stop="\n"), "r")[0].sampling_params.stop
    ) == ["\n"]
    two = convert.completion_requests(completion(stop=["a", "b"]), "r")[0].sampling_params
    assert list(two.stop) == ["a", "b"]


def test_native_request() -> None:
    body = GenerateRequest.model_validate(
        {
            "input_ids": [5, 6],
            "rid": "mine",
            "return_logprob": True,
            "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 3, "stop": "x", "sampling_seed": 9},
        }
    )
    (request,) = convert.native_requests(body, "ignored")
    assert request.request_id == "mine"
    assert list(request.token_ids.ids) == [5, 6]
    params = request.sampling_params
    assert (params.max_new_tokens, list(params.stop), params.seed) == (3, ["x"], 9)
    assert params.logprobs and params.top_logprobs == 2
    both = GenerateRequest.model_validate({"text": "a", "input_ids": [1]})
    with pytest.raises(APIError):
        convert.native_requests(both, "rid")
    with pytest.raises(APIError):
        convert.native_requests(GenerateRequest.model_validate({}), "rid")


def test_piece_from_router_messages() -> None:
    middle = router_pb2.RouterGenerateResponse(text="he", token_ids=[1, 2])
    piece = convert.piece_from_pb(3, middle)
    assert (piece.index, piece.text, piece.token_ids) == (3, "he", (1, 2))
    assert piece.finish_reason is None and piece.usage is None
    last = router_pb2.RouterGenerateResponse(
        text="!",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        matched_stop="\n",
        usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3, cached_tokens=1),
        logprobs=[
            common_pb2.TokenLogprob(
                token_id=7, logprob=-0.5, top=[common_pb2.TopLogprob(token_id=7, logprob=-0.5)]
            )
        ],
    )
    piece = convert.piece_from_pb(0, last)
    assert piece.finish_reason == "stop" and piece.matched_stop == "\n"
    assert piece.usage == Usage(4, 3, 1)
    assert piece.logprobs[0].top == ((7, -0.5),)
    length = router_pb2.RouterGenerateResponse(finish_reason=common_pb2.FINISH_REASON_LENGTH)
    assert convert.piece_from_pb(0, length).finish_reason == "length"
    failed = router_pb2.RouterGenerateResponse(
        finish_reason=common_pb2.FINISH_REASON_ERROR, error="worker died"
    )
    with pytest.raises(GenerationError, match="worker died"):
        convert.piece_from_pb(0, failed)


def rpc_error(
    code: grpc.StatusCode, detail: common_pb2.ErrorDetail | None = None
) -> grpc.aio.AioRpcError:
    trailing = grpc.aio.Metadata()
    if detail is not None:
        trailing.add(ERROR_DETAIL_KEY, detail.SerializeToString())
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details="boom")


@pytest.mark.parametrize(
    ("code", "status"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, 400),
        (grpc.StatusCode.NOT_FOUND, 404),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        (grpc.StatusCode.UNAVAILABLE, 503),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        (grpc.StatusCode.INTERNAL, 500),
        (grpc.StatusCode.UNKNOWN, 500),
    ],
)
def test_grpc_codes_map_to_http(code: grpc.StatusCode, status: int) -> None:
    error = from_rpc_error(rpc_error(code))
    assert error.status == status
    body = error.body()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    assert "boom" in body["message"] and body["code"] == code.name.lower()


def test_error_detail_becomes_param() -> None:
    detail = common_pb2.ErrorDetail(field="token_ids", reason="too long")
    error = from_rpc_error(rpc_error(grpc.StatusCode.INVALID_ARGUMENT, detail))
    assert error.param == "token_ids"
    assert error.body()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        (("body", "messages", 0, "role"), "messages[0].role"),
        (("body", "stop", "str"), "stop"),
        (("body", "stop", "list[str]", 2), "stop[2]"),
        (
            ("body", "messages", 1, "content", "list[TextPart]", 0, "type"),
            "messages[1].content[0].type",
        ),
        (("body", "top_p"), "top_p"),
    ],
)
def test_validation_error_param(loc: tuple[Any, ...], param: str) -> None:
    error = from_validation_error(RequestValidationError([{"loc": loc, "msg": "bad", "type": "x"}]))
    assert (error.status, error.param) == (400, param)
    assert error.message == f"{param}: bad"
