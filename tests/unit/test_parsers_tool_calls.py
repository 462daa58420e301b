"""Tool-call parsers (``--tool-call-parser``): every way of cutting a sample into deltas
reassembles to the non-streamed parse, deltas have OpenAI's shape, markers and call JSON never
reach the content, and what is not a valid call to an offered tool is content."""

from __future__ import annotations

import json
import random
import re

import pytest

from pdmesh.parsers import (
    TOOL_CALL_PARSERS,
    ContentDelta,
    FunctionDelta,
    ToolCallDelta,
    ToolCallEvent,
    reasoning_parser,
    tool_call_parser,
    validate_tools,
)
from pdmesh.parsers.tool_calls import ParsedToolCalls, assemble

TOOLS = validate_tools(
    [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
        {"type": "function", "function": {"name": "get_time"}},
    ]
)
CALL_ID = re.compile(r"call_[A-Za-z0-9]{24}")
MARKERS = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", '"name"')


def chunkings(text: str, seed: int = 0) -> list[list[str]]:
    """Single characters, every 2-piece split, and random runs of 1..N characters."""
    n = len(text)
    out = [[text], list(text)] + [[text[:i], text[i:]] for i in range(n + 1)]
    rng = random.Random(seed)
    for max_len in (2, 3, 5, 8, 13):
        for _ in range(6):
            pieces, i = [], 0
            while i < n:
                k = rng.randint(1, max_len)
                pieces.append(text[i : i + k])
                i += k
            out.append(pieces)
    return out


def stream(name: str, pieces: list[str], tools: object = TOOLS) -> list[ToolCallEvent]:
    parser = tool_call_parser(name, tools)  # type: ignore[arg-type]
    events: list[ToolCallEvent] = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def plain(result: ParsedToolCalls) -> tuple[str, list[tuple[str, str]]]:
    return result.content, [(c.name, c.arguments_json) for c in result.calls]


def check_delta_shapes(events: list[ToolCallEvent]) -> None:
    """OpenAI's streaming shape: a call's first delta has id/type/name and arguments "",
    later ones only index and a fragment; indices count up from 0."""
    seen: set[int] = set()
    for event in events:
        if isinstance(event, ContentDelta):
            assert event.text
            continue
        assert isinstance(event, ToolCallDelta)
        if event.index not in seen:
            assert event.index == len(seen)
            assert event.id is not None and CALL_ID.fullmatch(event.id)
            assert event.type == "function" and event.function.name
            assert event.function.arguments == ""
            assert event.to_openai()["function"] == {"name": event.function.name, "arguments": ""}
            seen.add(event.index)
        else:
            assert event.id is None and event.type is None and event.function.name is None
            assert event.function.arguments
            assert set(event.to_openai()) == {"index", "function"}


W = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
W_ARGS = '{"city": "Paris", "unit": "celsius"}'
T = '{"name": "get_time", "arguments": {}}'

# (parser, text, content, calls) for well-formed outputs
VALID = [
    ("qwen25", f"<tool_call>\n{W}\n</tool_call>", "", [("get_weather", W_ARGS)]),
    (
        "qwen25",
        f"Let me check.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n{T}\n</tool_call>\nDone.",
        "Let me check.\nDone.",
        [("get_weather", W_ARGS), ("get_time", "{}")],
    ),
    (  # marker text and braces inside argument strings, escapes, nesting, keys in any order
        "hermes",
        '<tool_call>{"arguments": {"q": "a </tool_call> \\"b\\" {[", "n": [1, {"x": null}]}, '
        '"id": 7, "name": "get_weather"}</tool_call>',
        "",
        [("get_weather", '{"q": "a </tool_call> \\"b\\" {[", "n": [1, {"x": null}]}')],
    ),
    ("qwen", '<tool_call>\n{"name": "get_time"}\n</tool_call>', "", [("get_time", "{}")]),
    (
        "qwen25",
        "No tools needed: 2 < 3 and <b>bold</b>.",
        "No tools needed: 2 < 3 and <b>bold</b>.",
        [],
    ),
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "",
        [("get_weather", '{"city": "Paris"}')],
    ),
    (
        "llama3",
        'Calling.<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}}',
        "Calling.",
        [("get_weather", '{"city": "Paris"}'), ("get_time", "{}")],
    ),
    ("llama3", "  Just text {not json}", "  Just text {not json}", []),
    (
        "mistral",
        f"Sure. [TOOL_CALLS] [{W}, {T}] Anything else?",
        "Sure. Anything else?",
        [("get_weather", W_ARGS), ("get_time", "{}")],
    ),
    ("mistral", f"[TOOL_CALLS][{W}]", "", [("get_weather", W_ARGS)]),
    ("mistral", "See [1] and [TOOL_CALLS", "See [1] and [TOOL_CALLS", []),
]


@pytest.mark.parametrize(("name", "text", "content", "calls"), VALID)
def test_valid_outputs_stream_exactly_as_parsed(
    name: str, text: str, content: str, calls: list[tuple[str, str]]
) -> None:
    assert plain(tool_call_parser(name, TOOLS).parse(text)) == (content, calls)
    for arguments in (a for _, a in calls):
        json.loads(arguments)
    for pieces in chunkings(text):
        events = stream(name, pieces)
        check_delta_shapes(events)
        assert plain(assemble(events)) == (content, calls), pieces
        if calls:  # nothing of the call syntax leaked into the content
            streamed = "".join(e.text for e in events if isinstance(e, ContentDelta))
            assert not any(m in streamed for m in MARKERS)


# not a call: given back as content whole, streamed or not (SGLang drops calls to undefined
# functions with a warning; vLLM's parsers return unparsable output as content)
NOT_CALLS = [
    ("qwen25", '<tool_call>\n{"name": "launch_rocket", "arguments": {}}\n</tool_call>'),
    ("qwen25", "Text <tool_call>\n{name: get_weather}\n</tool_call> more"),
    ("qwen25", "<tool_call>not json at all</tool_call>"),
    ("qwen25", '<tool_call>{"name": "get_weather", "arguments": "city=Paris"}</tool_call>'),
    ("qwen25", '<tool_call>{"name": ["get_weather"]}</tool_call>'),
    ("qwen25", '<tool_call>{"arguments": {}}</tool_call>'),
    ("llama3", '{"answer": 42, "why": "because"}'),
    ("llama3", '{"name": "rm_rf", "parameters": {"path": "/"}}'),
    ("mistral", "[TOOL_CALLS] [1, 2, 3]"),
    ("mistral", '[TOOL_CALLS] {"name": "get_weather"}'),
]


@pytest.mark.parametrize(("name", "text"), NOT_CALLS)
def test_what_is_not_a_call_is_content(name: str, text: str) -> None:
    assert plain(tool_call_parser(name, TOOLS).parse(text)) == (text, [])
    for pieces in chunkings(text):
        assert plain(assemble(stream(name, pieces))) == (text, []), pieces


def test_unknown_function_then_a_valid_call() -> None:
    bad = '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>'
    text = f"{bad}\n<tool_call>\n{W}\n</tool_call>"
    expected = (bad + "\n", [("get_weather", W_ARGS)])
    assert plain(tool_call_parser("qwen25", TOOLS).parse(text)) == expected
    for pieces in chunkings(text):
        assert plain(assemble(stream("qwen25", pieces))) == expected


def test_without_tools_everything_is_content() -> None:
    text = f"<tool_call>\n{W}\n</tool_call>"
    for name in TOOL_CALL_PARSERS:
        assert plain(tool_call_parser(name).parse(text)) == (text, [])
        assert plain(assemble(stream(name, list(text), tools=None))) == (text, [])


def test_raw_openai_tools_are_accepted_and_validated() -> None:
    raw = [{"type": "function", "function": {"name": "get_time"}}]
    assert plain(tool_call_parser("qwen25", raw).parse(f"<tool_call>{T}</tool_call>")) == (
        "",
        [("get_time", "{}")],
    )


def test_broken_after_commit_non_streamed_is_content_streamed_keeps_what_was_sent() -> None:
    """Streaming sends a call once its name and arguments began; it cannot take that back.
    The rest of that block is dropped, not leaked as content."""
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"} oops}</tool_call>after'
    )
    assert plain(tool_call_parser("qwen25", TOOLS).parse(text)) == (text, [])
    for pieces in chunkings(text):
        assert plain(assemble(stream("qwen25", pieces))) == (
            "after",
            [("get_weather", '{"city": "Paris"}')],
        )


def test_invalid_json_inside_the_arguments_is_content_when_not_streamed() -> None:
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": tru}}</tool_call>'
    assert plain(tool_call_parser("qwen25", TOOLS).parse(text)) == (text, [])


def test_cut_off_call() -> None:
    text = 'Hm.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    assert plain(tool_call_parser("qwen25", TOOLS).parse(text)) == (text, [])
    for pieces in chunkings(text):
        events = stream("qwen25", pieces)
        check_delta_shapes(events)
        assert plain(assemble(events)) == ("Hm.", [("get_weather", '{"city": "Par')])
    # cut before the call was committed: content
    text = '<tool_call>\n{"name": "get_wea'
    assert plain(assemble(stream("qwen25", list(text)))) == (text, [])


def test_arguments_stream_as_they_grow() -> None:
    parser = tool_call_parser("qwen25", TOOLS)
    assert parser.feed("Ok <tool_") == [ContentDelta("Ok ")]  # marker prefix held back
    assert parser.feed('call>\n{"name": "get_weather"') == []  # no arguments yet: not sent
    first = parser.feed(', "arguments": {"ci')
    assert [type(e) for e in first] == [ToolCallDelta, ToolCallDelta]
    assert first[0].function.name == "get_weather" and first[1].function.arguments == '{"ci'
    assert parser.feed('ty": "Pa') == [ToolCallDelta(0, FunctionDelta(None, 'ty": "Pa'))]
    rest = parser.feed('ris"}}\n</tool_call>') + parser.finish()
    assert "".join(e.function.arguments for e in rest if isinstance(e, ToolCallDelta)) == 'ris"}'
    assert parser.has_calls


def test_long_arguments_fed_one_character_at_a_time() -> None:
    # the scanner looks only at new characters, so this stays linear
    value = 'x\\"{[' * 4000
    text = f'<tool_call>{{"name": "get_weather", "arguments": {{"city": "{value}"}}}}</tool_call>'
    events = stream("qwen25", list(text))
    assert plain(assemble(events)) == ("", [("get_weather", f'{{"city": "{value}"}}')])


def test_reasoning_then_tool_calls_on_the_content_side() -> None:
    text = (
        "<think>\nThe user wants the weather; I should call get_weather.\n</think>\n\n"
        f"<tool_call>\n{W}\n</tool_call>"
    )
    reasoning, content = reasoning_parser("qwen3").split(text)
    assert reasoning == "\nThe user wants the weather; I should call get_weather.\n"
    expected = plain(tool_call_parser("qwen25", TOOLS).parse(content))
    assert expected == ("\n\n", [("get_weather", W_ARGS)])  # the blank line after </think>
    for pieces in chunkings(text):
        rp, tp = reasoning_parser("qwen3"), tool_call_parser("qwen25", TOOLS)
        got_reasoning: list[str] = []
        events: list[ToolCallEvent] = []
        for piece in [*pieces, None]:
            d = rp.feed(piece) if piece is not None else rp.finish()
            got_reasoning.append(d.reasoning)
            events += tp.feed(d.content)
        events += tp.finish()
        assert "".join(got_reasoning) == reasoning
        assert plain(assemble(events)) == expected


def test_registry_names_and_error() -> None:
    assert {"qwen25", "qwen", "hermes", "llama3", "mistral"} <= set(TOOL_CALL_PARSERS)
    with pytest.raises(ValueError, match="hermes, llama3, mistral, qwen, qwen25"):
        tool_call_parser("gpt4")
