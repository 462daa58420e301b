"""The router's output shaping: tool_choice → grammar on the worker request, and the text of a
generation split into content, reasoning and tool-call deltas message by message."""

from __future__ import annotations

import json

import pytest

from pdmesh.errors import InvalidRequestError
from pdmesh.v1 import common_pb2, router_pb2
from services.router.output_parsing import OutputParsers, OutputShaper, output_shaper

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(
    tools: list[dict] | None = None, choice: router_pb2.ToolChoice | None = None, **fields: object
) -> router_pb2.RouterGenerateRequest:
    chat = common_pb2.ChatRequest(messages=[common_pb2.ChatMessage(role="user", content="hi")])
    if tools is not None:
        chat.tools_json = json.dumps(tools)
    out = router_pb2.RouterGenerateRequest(chat=chat, **fields)  # type: ignore[arg-type]
    if choice is not None:
        out.tool_choice.CopyFrom(choice)
    return out


def run(shaper: OutputShaper, pieces: list[str], finish: int = common_pb2.FINISH_REASON_STOP):
    """Feed ``pieces`` as one message each (the last final); the shaped messages."""
    outs = []
    for i, piece in enumerate(pieces):
        out = router_pb2.RouterGenerateResponse(text=piece)
        final = i == len(pieces) - 1
        if final:
            out.finish_reason = finish  # type: ignore[assignment]
        shaper.shape(out, final)
        outs.append(out)
    return outs


def calls_of(outs: list[router_pb2.RouterGenerateResponse]) -> dict[int, dict[str, str]]:
    calls: dict[int, dict[str, str]] = {}
    for out in outs:
        for d in out.tool_calls:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            assert not (d.id and call["id"]), "an id comes once, on the call's first delta"
            call["id"] += d.id
            call["name"] += d.name
            call["arguments"] += d.arguments
    return calls


def split_every(text: str, n: int) -> list[str]:
    return [text[i : i + n] for i in range(0, len(text), n)]


def test_no_tools_no_parsers_passes_text_through() -> None:
    assert output_shaper(request(), OutputParsers("qwen25", "")) is None
    none = router_pb2.ToolChoice(mode=router_pb2.TOOL_CHOICE_MODE_NONE)
    assert output_shaper(request([WEATHER], none), OutputParsers("qwen25")) is None


def test_required_sets_a_grammar_and_parses_the_array() -> None:
    req = request([WEATHER, TIME], router_pb2.ToolChoice(mode=router_pb2.TOOL_CHOICE_MODE_REQUIRED))
    shaper = output_shaper(req, OutputParsers())
    assert shaper is not None
    schema = json.loads(req.sampling_params.json_schema)
    assert schema["type"] == "array" and schema["minItems"] == 1
    text = json.dumps([{"name": "get_weather", "parameters": {"city": "Paris"}}])
    outs = run(shaper, split_every(text, 3))
    calls = calls_of(outs)
    assert list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert "".join(o.text for o in outs) == ""
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


def test_required_single_call_when_parallel_is_off() -> None:
    req = request(
        [WEATHER],
        router_pb2.ToolChoice(mode=router_pb2.TOOL_CHOICE_MODE_REQUIRED),
        parallel_tool_calls=False,
    )
    output_shaper(req, OutputParsers())
    assert json.loads(req.sampling_params.json_schema)["maxItems"] == 1


def test_named_choice_is_the_arguments_object_and_finishes_stop() -> None:
    req = request([WEATHER, TIME], router_pb2.ToolChoice(function_name="get_weather"))
    shaper = output_shaper(req, OutputParsers())
    assert shaper is not None
    schema = json.loads(req.sampling_params.json_schema)
    assert schema["properties"] == {"city": {"type": "string"}}
    outs = run(shaper, split_every('{"city": "Oslo"}', 2))
    calls = calls_of(outs)
    assert calls[0]["name"] == "get_weather"
    assert json.loads(calls[0]["arguments"]) == {"city": "Oslo"}
    # OpenAI: a named tool_choice answers with finish_reason "stop"
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_STOP


def test_auto_uses_the_routers_parser_on_free_text() -> None:
    shaper = output_shaper(request([WEATHER]), OutputParsers("qwen25"))
    assert shaper is not None
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    outs = run(shaper, split_every(text, 1))  # one character per message: the hard case
    assert "".join(o.text for o in outs).strip() == "Let me check."
    calls = calls_of(outs)
    assert json.loads(calls[0]["arguments"]) == {"city": "Rome"}
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


def test_auto_without_calls_keeps_text_and_finish() -> None:
    shaper = output_shaper(request([WEATHER]), OutputParsers("qwen25"))
    assert shaper is not None
    outs = run(shaper, ["It is ", "sunny."], finish=common_pb2.FINISH_REASON_LENGTH)
    assert "".join(o.text for o in outs) == "It is sunny."
    assert not calls_of(outs)
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH


def test_reasoning_is_split_before_tool_parsing() -> None:
    shaper = output_shaper(request([WEATHER]), OutputParsers("qwen25", "deepseek-r1"))
    assert shaper is not None
    text = 'hmm, <tool_call> maybe</think>ok<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>'
    outs = run(shaper, split_every(text, 4))
    # deepseek-r1 starts in reasoning: a marker inside the thinking is no call
    assert "".join(o.reasoning_text for o in outs) == "hmm, <tool_call> maybe"
    assert "".join(o.text for o in outs) == "ok"
    assert json.loads(calls_of(outs)[0]["arguments"]) == {"city": "A"}


def test_separate_reasoning_false_keeps_thinking_in_text() -> None:
    req = request(separate_reasoning=False)
    assert output_shaper(req, OutputParsers("", "qwen3")) is None


@pytest.mark.parametrize(
    ("req", "parsers", "param"),
    [
        (request([WEATHER]), OutputParsers(), "tool_choice"),  # auto, no --tool-call-parser
        (request(choice=router_pb2.ToolChoice(function_name="x")), OutputParsers(), "tool_choice"),
        (
            request([WEATHER], router_pb2.ToolChoice(function_name="nope")),
            OutputParsers(),
            "tool_choice.function.name",
        ),
        (
            request(
                [WEATHER],
                router_pb2.ToolChoice(mode=router_pb2.TOOL_CHOICE_MODE_REQUIRED),
                sampling_params=common_pb2.SamplingParams(regex="a+"),
            ),
            OutputParsers(),
            "tool_choice",
        ),
        (
            request(
                [WEATHER],
                sampling_params=common_pb2.SamplingParams(detokenize=False),
            ),
            OutputParsers("qwen25"),
            "sampling_params.detokenize",
        ),
        (
            router_pb2.RouterGenerateRequest(chat=common_pb2.ChatRequest(tools_json="[{not json")),
            OutputParsers("qwen25"),
            "chat.tools_json",
        ),
        (request([{"type": "function"}]), OutputParsers("qwen25"), "chat.tools_json[0].function"),
    ],
)
def test_unservable_requests_name_the_field(
    req: router_pb2.RouterGenerateRequest, parsers: OutputParsers, param: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        output_shaper(req, parsers)
    assert info.value.field == param
