"""Parsing model output into what the OpenAI API returns: reasoning, tool calls, and what
constrained decoding needs for ``tool_choice``. Pure Python (no gRPC, no torch), so the
router (where the text is produced) and the gateway can both use it.

- ``reasoning``: ``--reasoning-parser`` (``deepseek-r1``, ``qwen3``): ``<think>`` blocks
- ``tool_calls``: ``--tool-call-parser`` (``qwen25``/``qwen``/``hermes``, ``llama3``,
  ``mistral``): calls in free text, streamed as OpenAI tool-call deltas
- ``tool_choice``: validation of ``tools``/``tool_choice``, the JSON schemas for ``required``
  and named choices, and the parsers of the outputs constrained by them

Run the reasoning parser first and the tool-call parser on its content side.
"""

from pdmesh.parsers.reasoning import (
    REASONING_PARSERS,
    ReasoningDelta,
    ReasoningParser,
    reasoning_parser,
)
from pdmesh.parsers.tool_calls import (
    TOOL_CALL_PARSERS,
    ContentDelta,
    FunctionDelta,
    ParsedToolCalls,
    ToolCall,
    ToolCallDelta,
    ToolCallEvent,
    ToolCallParser,
    tool_call_parser,
    tool_call_parser_class,
)
from pdmesh.parsers.tool_spec import ToolSpec, validate_tools

__all__ = [
    "REASONING_PARSERS",
    "TOOL_CALL_PARSERS",
    "ContentDelta",
    "FunctionDelta",
    "ParsedToolCalls",
    "ReasoningDelta",
    "ReasoningParser",
    "ToolCall",
    "ToolCallDelta",
    "ToolCallEvent",
    "ToolCallParser",
    "ToolSpec",
    "reasoning_parser",
    "tool_call_parser",
    "tool_call_parser_class",
    "validate_tools",
]
