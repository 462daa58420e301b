"""Every parser over the default model's real tokenizer, one token at a time: tokens split
markers and JSON where a BPE vocabulary does (``<tool`` + ``_call``, ``"}`` + ``}``), and the
streamed result must still equal the non-streamed one. Needs only the cached tokenizer files;
skipped when the default model was never converted here."""

from __future__ import annotations

import pytest

from pdmesh.models.fetch import is_complete, model_dir
from pdmesh.parsers import ToolCallEvent, reasoning_parser, tool_call_parser
from pdmesh.parsers.tool_calls import assemble
from pdmesh.parsers.tool_choice import NamedToolCallParser, RequiredToolCallsParser
from pdmesh.tokenizer import StreamDetokenizer, Tokenizer
from tests.unit.test_parsers_tool_calls import TOOLS, plain

pytestmark = pytest.mark.model

W = '{"name": "get_weather", "arguments": {"city": "São Paulo", "unit": "celsius"}}'
SAMPLES = {
    "qwen25": f"Checking 🌦.\n<tool_call>\n{W}\n</tool_call>\n<tool_call>\n"
    '{"name": "get_time", "arguments": {}}\n</tool_call>',
    "llama3": '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Köln"}}; '
    '{"name": "get_time", "parameters": {}}',
    "mistral": f"Ok [TOOL_CALLS] [{W}] done",
}


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    path = model_dir()
    if not is_complete(path):
        pytest.skip("the default model is not cached (python -m pdmesh.models.fetch)")
    return Tokenizer.from_dir(path)


def token_deltas(tok: Tokenizer, text: str) -> list[str]:
    detok = StreamDetokenizer(tok)
    ids = tok.encode(text, add_special_tokens=False)
    deltas = [detok.add([i]).text for i in ids] + [detok.add([], final=True).text]
    assert "".join(deltas) == text
    return deltas


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_tool_call_parsers_token_by_token(tokenizer: Tokenizer, name: str) -> None:
    text = SAMPLES[name]
    expected = plain(tool_call_parser(name, TOOLS).parse(text))
    assert expected[1]
    parser = tool_call_parser(name, TOOLS)
    events: list[ToolCallEvent] = []
    for delta in token_deltas(tokenizer, text):
        events += parser.feed(delta)
    assert plain(assemble(events + parser.finish())) == expected


def test_constrained_parsers_token_by_token(tokenizer: Tokenizer) -> None:
    for parser, text in (
        (RequiredToolCallsParser(TOOLS), f"[{W.replace('arguments', 'parameters')}]"),
        (NamedToolCallParser(TOOLS, function_name="get_weather"), '{"city": "Zürich"}'),
    ):
        expected = plain(parser.parse(text))
        assert expected[1]
        events = [e for d in token_deltas(tokenizer, text) for e in parser.feed(d)]
        assert plain(assemble(events + parser.finish())) == expected


@pytest.mark.parametrize("name", ["deepseek-r1", "qwen3"])
def test_reasoning_then_tools_token_by_token(tokenizer: Tokenizer, name: str) -> None:
    text = "<think>\nWeather → tool.\n</think>\n\n" + SAMPLES["qwen25"]
    reasoning, content = reasoning_parser(name).split(text)
    assert reasoning == "\nWeather → tool.\n"
    expected = plain(tool_call_parser("qwen25", TOOLS).parse(content))
    rp, tp = reasoning_parser(name), tool_call_parser("qwen25", TOOLS)
    got: list[str] = []
    events: list[ToolCallEvent] = []
    for delta in token_deltas(tokenizer, text):
        d = rp.feed(delta)
        got.append(d.reasoning)
        events += tp.feed(d.content)
    d = rp.finish()
    got.append(d.reasoning)
    events += tp.feed(d.content) + tp.finish()
    assert "".join(got) == reasoning
    assert plain(assemble(events)) == expected
