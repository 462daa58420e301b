"""``tool_choice``: validation errors name the field, the schemas constrained decoding gets
(vLLM's shape), and the parsers of the constrained outputs (streamed = non-streamed)."""

from __future__ import annotations

import json

import pytest

from pdmesh.errors import InvalidRequestError
from pdmesh.parsers import ToolCallDelta, validate_tools
from pdmesh.parsers.tool_calls import assemble
from pdmesh.parsers.tool_choice import (
    NamedToolCallParser,
    RequiredToolCallsParser,
    ToolChoice,
    named_tool_call_schema,
    required_tool_calls_schema,
    tool_choice_parser,
    tool_choice_schema,
    validate_tool_choice,
)
from tests.unit.test_parsers_tool_calls import chunkings, plain

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "when": {"$ref": "#/$defs/Day"}},
            "required": ["city"],
            "$defs": {"Day": {"type": "string", "enum": ["today", "tomorrow"]}},
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
TOOLS = validate_tools([WEATHER, TIME])


@pytest.mark.parametrize(
    ("tools", "field"),
    [
        ({"type": "function"}, "tools"),
        (["x"], "tools[0]"),
        ([{"type": "retrieval", "function": {"name": "a"}}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": {"name": "bad name!"}}], "tools[0].function.name"),
        ([TIME, {"type": "function", "function": {}}], "tools[1].function.name"),
        ([TIME, TIME], "tools[1].function.name"),
        (
            [{"type": "function", "function": {"name": "a", "parameters": []}}],
            "tools[0].function.parameters",
        ),
        (
            [{"type": "function", "function": {"name": "a", "strict": "yes"}}],
            "tools[0].function.strict",
        ),
    ],
)
def test_bad_tools_name_the_field(tools: object, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_tools(tools)
    assert info.value.field == field


@pytest.mark.parametrize(
    ("choice", "tools", "field"),
    [
        ("sometimes", TOOLS, "tool_choice"),
        ("required", [], "tool_choice"),
        (3, TOOLS, "tool_choice"),
        ({"type": "tool", "function": {"name": "get_time"}}, TOOLS, "tool_choice.type"),
        ({"type": "function"}, TOOLS, "tool_choice.function"),
        ({"type": "function", "function": {"name": "nope"}}, TOOLS, "tool_choice.function.name"),
    ],
)
def test_bad_tool_choice_names_the_field(choice: object, tools: list, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_tool_choice(choice, tools)
    assert info.value.field == field


def test_tool_choice_values() -> None:
    assert validate_tool_choice(None, TOOLS) == ToolChoice("auto")
    assert validate_tool_choice(None, []) == ToolChoice("none")
    assert validate_tool_choice("none", []) == ToolChoice("none")
    assert validate_tool_choice("required", TOOLS).constrained
    named = validate_tool_choice({"type": "function", "function": {"name": "get_time"}}, TOOLS)
    assert named == ToolChoice("function", "get_time") and named.constrained
    assert tool_choice_schema(TOOLS, ToolChoice("auto")) is None
    assert tool_choice_parser(TOOLS, ToolChoice("none")) is None


def test_required_schema_is_a_non_empty_array_of_calls() -> None:
    schema = required_tool_calls_schema(TOOLS)
    assert schema["type"] == "array" and schema["minItems"] == 1 and "maxItems" not in schema
    weather, time = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "const": "get_weather"}
    assert weather["required"] == ["name", "parameters"]
    # $defs move to the root so "#/$defs/Day" still resolves; the request is not modified
    assert schema["$defs"] == {"Day": {"type": "string", "enum": ["today", "tomorrow"]}}
    assert "$defs" not in weather["properties"]["parameters"]
    assert "$defs" in WEATHER["function"]["parameters"]  # type: ignore[index]
    assert time["properties"]["parameters"] == {
        "type": "object",
        "properties": {},
        "additionalProperties": False,
    }
    assert required_tool_calls_schema(TOOLS, parallel_tool_calls=False)["maxItems"] == 1


def test_required_schema_validates_what_it_should() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = required_tool_calls_schema(TOOLS, parallel_tool_calls=False)
    ok = [{"name": "get_weather", "parameters": {"city": "Paris", "when": "today"}}]
    jsonschema.validate(ok, schema)
    for bad in (
        [],
        [{"name": "get_weather", "parameters": {"when": "today"}}],
        [{"name": "launch", "parameters": {}}],
        ok + [{"name": "get_time", "parameters": {}}],
        [{"name": "get_weather", "parameters": {"city": "P", "when": "yesterday"}}],
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_conflicting_defs_name_the_tool() -> None:
    other = json.loads(json.dumps(WEATHER))
    other["function"]["name"] = "get_weather2"
    other["function"]["parameters"]["$defs"]["Day"] = {"type": "integer"}
    with pytest.raises(InvalidRequestError) as info:
        required_tool_calls_schema(validate_tools([WEATHER, other]))
    assert info.value.field == "tools[1].function.parameters.$defs.Day"


def test_named_schema_is_the_parameters() -> None:
    expected = {**WEATHER["function"]["parameters"], "additionalProperties": False}  # type: ignore[dict-item]
    assert named_tool_call_schema(TOOLS, "get_weather") == expected
    closed = {"type": "object", "properties": {}, "additionalProperties": False}
    assert named_tool_call_schema(TOOLS, "get_time") == closed
    assert tool_choice_schema(TOOLS, ToolChoice("function", "get_time")) == closed


REQUIRED = [
    (
        '[{"name": "get_weather", "parameters": {"city": "Paris", "when": "today"}}, '
        '{"name": "get_time", "parameters": {}}]',
        "",
        [("get_weather", '{"city": "Paris", "when": "today"}'), ("get_time", "{}")],
    ),
    ('\n[ {"name":"get_time","parameters":{}} ]\n', "", [("get_time", "{}")]),
    ("I refuse.", "I refuse.", []),
    ('[{"name": "launch", "parameters": {}}]', '[{"name": "launch", "parameters": {}}]', []),
]


@pytest.mark.parametrize(("text", "content", "calls"), REQUIRED)
def test_required_parser(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    parser = tool_choice_parser(TOOLS, ToolChoice("required"))
    assert isinstance(parser, RequiredToolCallsParser)
    assert plain(parser.parse(text)) == (content, calls)
    for pieces in chunkings(text):
        p = RequiredToolCallsParser(TOOLS)
        events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
        assert plain(assemble(events)) == (content, calls), pieces


NAMED = [
    (
        ' {"city": "Paris", "when": "tomorrow"}',
        "",
        [("get_weather", '{"city": "Paris", "when": "tomorrow"}')],
    ),
    ('{"city": "a}\\"{"}', "", [("get_weather", '{"city": "a}\\"{"}')]),
    ("Paris", "Paris", []),
]


@pytest.mark.parametrize(("text", "content", "calls"), NAMED)
def test_named_parser(text: str, content: str, calls: list[tuple[str, str]]) -> None:
    choice = validate_tool_choice({"type": "function", "function": {"name": "get_weather"}}, TOOLS)
    parser = tool_choice_parser(TOOLS, choice)
    assert isinstance(parser, NamedToolCallParser)
    assert plain(parser.parse(text)) == (content, calls)
    for pieces in chunkings(text):
        p = NamedToolCallParser(TOOLS, function_name="get_weather")
        events = [e for piece in pieces for e in p.feed(piece)] + p.finish()
        assert plain(assemble(events)) == (content, calls), pieces


def test_named_parser_sends_the_name_at_the_first_brace() -> None:
    p = NamedToolCallParser(TOOLS, function_name="get_weather")
    assert p.feed("  ") == []
    header, fragment = p.feed('{"ci')
    assert isinstance(header, ToolCallDelta) and header.function.name == "get_weather"
    assert header.id is not None and header.function.arguments == ""
    assert isinstance(fragment, ToolCallDelta) and fragment.function.arguments == '{"ci'
    with pytest.raises(InvalidRequestError):
        NamedToolCallParser(TOOLS, function_name="nope")


def test_constraint_closes_open_objects_only() -> None:
    # JSON Schema leaves an object open unless it says otherwise; the grammar closes those
    # (a small model otherwise invents keys until max_tokens), keeps an explicit choice, and
    # never mistakes a property named "properties" for a keyword
    params = {
        "type": "object",
        "properties": {
            "where": {"type": "object", "properties": {"city": {"type": "string"}}},
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
            "properties": {"type": "string"},
            "list": {"type": "array", "items": {"type": "object", "properties": {}}},
        },
    }
    tool = {"type": "function", "function": {"name": "f", "parameters": params}}
    schema = named_tool_call_schema(validate_tools([tool]), "f")
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert props["where"]["additionalProperties"] is False
    assert props["extra"]["additionalProperties"] is True
    assert props["properties"] == {"type": "string"}
    assert props["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in params  # the request's tools are left as given
