"""Tool-call parsers for ``--tool-call-parser`` (SGLang's names) and their event types."""

from __future__ import annotations

from pdmesh.parsers.tool_calls.base import JsonSectionParser, SectionSyntax, ToolCallParser
from pdmesh.parsers.tool_calls.events import (
    ContentDelta,
    FunctionDelta,
    ParsedToolCalls,
    ToolCall,
    ToolCallDelta,
    ToolCallEvent,
    assemble,
    new_call_id,
)
from pdmesh.parsers.tool_calls.formats import (
    Llama3ToolCallParser,
    MistralToolCallParser,
    Qwen25ToolCallParser,
)
from pdmesh.parsers.tool_spec import ToolsArg

# SGLang's names; "qwen" and "hermes" are SGLang's other names for the same <tool_call> format
TOOL_CALL_PARSERS: dict[str, type[ToolCallParser]] = {
    "qwen25": Qwen25ToolCallParser,
    "qwen": Qwen25ToolCallParser,
    "hermes": Qwen25ToolCallParser,
    "llama3": Llama3ToolCallParser,
    "mistral": MistralToolCallParser,
}


def tool_call_parser_class(name: str) -> type[ToolCallParser]:
    """The class for ``--tool-call-parser NAME`` (check the flag at startup with this);
    ValueError naming the valid names."""
    try:
        return TOOL_CALL_PARSERS[name]
    except KeyError:
        valid = ", ".join(sorted(TOOL_CALL_PARSERS))
        raise ValueError(f"unknown tool call parser {name!r}; valid names: {valid}") from None


def tool_call_parser(name: str, tools: ToolsArg = None) -> ToolCallParser:
    """A fresh parser for one request's output."""
    return tool_call_parser_class(name)(tools)


__all__ = [
    "TOOL_CALL_PARSERS",
    "ContentDelta",
    "FunctionDelta",
    "JsonSectionParser",
    "Llama3ToolCallParser",
    "MistralToolCallParser",
    "ParsedToolCalls",
    "Qwen25ToolCallParser",
    "SectionSyntax",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallEvent",
    "ToolCallParser",
    "assemble",
    "new_call_id",
    "tool_call_parser",
    "tool_call_parser_class",
]
