"""The ``--tool-call-parser`` formats (SGLang's names), each a ``SectionSyntax``."""

from __future__ import annotations

from pdmesh.parsers.tool_calls.base import JsonSectionParser, SectionSyntax


class Qwen25ToolCallParser(JsonSectionParser):
    """Qwen 2.5 / Qwen3 / Hermes 2 Pro (SGLang ``qwen25``, ``qwen``, ``hermes``): each call in
    its own block, ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, with
    text allowed around the blocks."""

    name = "qwen25"
    syntax = SectionSyntax(markers=("<tool_call>",), close="</tool_call>", resync="</tool_call>")


class Llama3ToolCallParser(JsonSectionParser):
    """Llama 3.1/3.2 JSON tool calling (SGLang ``llama3``): ``<|python_tag|>`` optional (an
    output that starts with ``{`` is a call too), ``{"name": ..., "parameters": {...}}``
    (``arguments`` accepted too), several calls separated by ``;`` as SGLang does."""

    name = "llama3"
    syntax = SectionSyntax(markers=("<|python_tag|>",), separator=";", implicit_start=True)


class MistralToolCallParser(JsonSectionParser):
    """Mistral (SGLang ``mistral``): ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``."""

    name = "mistral"
    syntax = SectionSyntax(markers=("[TOOL_CALLS]",), open="[", separator=",", close="]")
