"""Proto ↔ ``pdmesh.tokenizer`` values, for the tokenizer service's edge only.

JSON carried in string fields (tools, tool calls, template kwargs) is parsed here, so a
malformed one is an ``InvalidRequestError`` naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from pdmesh.errors import InvalidRequestError
from pdmesh.tokenizer import ChatMessage, ChatRequest, StreamDelta, TokenizerInfo
from pdmesh.v1 import common_pb2, tokenizer_pb2


def chat_from_pb(pb: common_pb2.ChatRequest) -> ChatRequest:
    tools = None
    if pb.HasField("tools_json"):
        tools = tuple(_json_list_of_objects(pb.tools_json, "chat.tools_json"))
    kwargs = {}
    if pb.HasField("template_kwargs_json"):
        kwargs = _json(pb.template_kwargs_json, "chat.template_kwargs_json", dict)
    return ChatRequest(
        messages=tuple(_message_from_pb(m, i) for i, m in enumerate(pb.messages)),
        tools=tools,
        # unset means true: a chat request almost always wants the assistant header
        add_generation_prompt=(
            pb.add_generation_prompt if pb.HasField("add_generation_prompt") else True
        ),
        template_kwargs=kwargs,
        continue_final_message=pb.HasField("continue_final_message") and pb.continue_final_message,
    )


def _message_from_pb(pb: common_pb2.ChatMessage, index: int) -> ChatMessage:
    tool_calls = None
    if pb.HasField("tool_calls_json"):
        field = f"messages[{index}].tool_calls_json"
        tool_calls = tuple(_json_list_of_objects(pb.tool_calls_json, field))
    return ChatMessage(
        role=pb.role,
        content=pb.content if pb.HasField("content") else None,
        name=pb.name if pb.HasField("name") else None,
        tool_calls=tool_calls,
        tool_call_id=pb.tool_call_id if pb.HasField("tool_call_id") else None,
    )


def info_to_pb(info: TokenizerInfo) -> tokenizer_pb2.GetTokenizerInfoResponse:
    return tokenizer_pb2.GetTokenizerInfoResponse(
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        bos_token_id=info.bos_token_id,
        has_chat_template=info.has_chat_template,
        eos_token=info.eos_token,
        bos_token=info.bos_token,
    )


def files_to_pb(
    info: TokenizerInfo, tokenizer_json: str, default_skip_special_tokens: bool
) -> tokenizer_pb2.GetTokenizerFilesResponse:
    added = json.loads(tokenizer_json).get("added_tokens") or []
    return tokenizer_pb2.GetTokenizerFilesResponse(
        model_name=info.model_name,
        tokenizer_json=tokenizer_json,
        vocab_size=info.vocab_size,
        eos_token_ids=info.eos_token_ids,
        special_token_ids=sorted(t["id"] for t in added if t.get("special")),
        default_skip_special_tokens=default_skip_special_tokens,
    )


def delta_to_pb(delta: StreamDelta) -> tokenizer_pb2.DetokenizeStreamResponse:
    return tokenizer_pb2.DetokenizeStreamResponse(
        text=delta.text,
        stopped=delta.stopped,
        stop_string=delta.stop_string or "",
        num_tokens=delta.num_tokens,
    )


def _json(raw: str, field: str, kind: type) -> Any:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InvalidRequestError(field, f"is not valid JSON: {e}") from e
    except RecursionError as e:  # Python's parser recurses per level (found by fuzzing)
        raise InvalidRequestError(field, "is nested too deeply") from e
    if not isinstance(value, kind):
        raise InvalidRequestError(field, f"must be a JSON {_json_kind(kind)}")
    return value


def _json_list_of_objects(raw: str, field: str) -> list[dict[str, Any]]:
    items = _json(raw, field, list)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InvalidRequestError(f"{field}[{i}]", "must be a JSON object")
    return items


def _json_kind(kind: type) -> str:
    return "object" if kind is dict else "array" if kind is list else kind.__name__
