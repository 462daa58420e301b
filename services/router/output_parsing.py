"""Reasoning and tool calls parsed out of a request's text, where the text is made (the router's
detokenizer), once per request: the gateway and gRPC clients get ``text``, ``reasoning_text``
and ``tool_calls`` already apart.

``OutputShaper.shape`` rewrites each outgoing message in place: the text goes through the
reasoning parser (``--reasoning-parser``), its content side through the tool-call parser, and
what each holds back (a possible ``<think>`` or ``<tool_call>`` not yet complete) follows with
a later message or the last one. ``tool_choice`` required or a named function are written by
constrained decoding (the worker's grammar, set here on the request's sampling params) in a
fixed JSON form with its own parser, so they work whatever --tool-call-parser says.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pdmesh.errors import InvalidRequestError
from pdmesh.parsers import tool_choice as choice
from pdmesh.parsers.reasoning import ReasoningParser, reasoning_parser
from pdmesh.parsers.tool_calls import ContentDelta, ToolCallParser, tool_call_parser
from pdmesh.parsers.tool_spec import validate_tools
from pdmesh.v1 import common_pb2, router_pb2

GRAMMAR_FIELDS = ("json_schema", "regex", "ebnf")


@dataclass(frozen=True)
class OutputParsers:
    """The router's --tool-call-parser and --reasoning-parser ("" for none)."""

    tool_call_parser: str = ""
    reasoning_parser: str = ""


@dataclass
class OutputShaper:
    """One request's parsers; ``shape`` is called on every message of it, in order."""

    reasoning: ReasoningParser | None
    tools: ToolCallParser | None
    # a named tool_choice answers with finish_reason "stop" (OpenAI's rule), the others
    # with "tool_calls" when they called any
    named: bool = False

    def shape(self, out: router_pb2.RouterGenerateResponse, final: bool) -> None:
        text = out.text
        if self.reasoning is not None:
            delta = self.reasoning.feed(text)
            reasoning, text = delta.reasoning, delta.content
            if final:
                last = self.reasoning.finish()
                reasoning, text = reasoning + last.reasoning, text + last.content
            out.reasoning_text = reasoning
        if self.tools is not None:
            events = self.tools.feed(text)
            if final:
                events += self.tools.finish()
            parts = []
            for e in events:
                if isinstance(e, ContentDelta):
                    parts.append(e.text)
                else:
                    out.tool_calls.add(
                        index=e.index,
                        id=e.id or "",
                        name=e.function.name or "",
                        arguments=e.function.arguments,
                    )
            text = "".join(parts)
            if (
                final
                and not self.named
                and self.tools.has_calls
                and out.finish_reason == common_pb2.FINISH_REASON_STOP
            ):
                out.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS
        out.text = text


def output_shaper(
    request: router_pb2.RouterGenerateRequest, parsers: OutputParsers
) -> OutputShaper | None:
    """The request's shaper (None: its text passes as it is). May set a grammar on
    ``request.sampling_params`` (tool_choice required / named); raises InvalidRequestError
    naming the field for what cannot be served."""
    params = request.sampling_params
    chat = request.chat if request.WhichOneof("input") == "chat" else None
    tools_json = chat.tools_json if chat is not None and chat.HasField("tools_json") else None
    has_choice = request.HasField("tool_choice")
    if tools_json is None and has_choice:
        raise InvalidRequestError("tool_choice", "needs a chat request with tools")
    tools = validate_tools(_tools_of(tools_json), "chat.tools_json") if tools_json else []
    mode, name = _choice(request)
    tool_parser: ToolCallParser | None = None
    named = False
    if tools and mode != router_pb2.TOOL_CHOICE_MODE_NONE:
        if params.HasField("detokenize") and not params.detokenize:
            raise InvalidRequestError("sampling_params.detokenize", "tool calls need the text")
        parallel = not request.HasField("parallel_tool_calls") or request.parallel_tool_calls
        if name or mode == router_pb2.TOOL_CHOICE_MODE_REQUIRED:
            given = [f for f in GRAMMAR_FIELDS if params.HasField(f)]
            if given:
                raise InvalidRequestError(
                    "tool_choice",
                    f"a required or named tool choice is written by constrained decoding and "
                    f"cannot be combined with sampling_params.{given[0]} (response_format)",
                )
            if name:
                params.json_schema = json.dumps(choice.named_tool_call_schema(tools, name))
                tool_parser = choice.NamedToolCallParser(tools, function_name=name)
                named = True
            else:
                schema = choice.required_tool_calls_schema(tools, parallel_tool_calls=parallel)
                params.json_schema = json.dumps(schema)
                tool_parser = choice.RequiredToolCallsParser(tools)
        elif not parsers.tool_call_parser:
            raise InvalidRequestError(
                "tool_choice",
                "auto (the default with tools) needs the router's --tool-call-parser, which "
                "is not set; use tool_choice required or a named function, or start the "
                "router with one",
            )
        else:
            tool_parser = tool_call_parser(parsers.tool_call_parser, tools)
    reasoning = None
    separate = not request.HasField("separate_reasoning") or request.separate_reasoning
    if parsers.reasoning_parser and separate and chat is not None:
        reasoning = reasoning_parser(parsers.reasoning_parser)
    if reasoning is None and tool_parser is None:
        return None
    return OutputShaper(reasoning, tool_parser, named)


def _tools_of(tools_json: str) -> object:
    try:
        return json.loads(tools_json)
    except (ValueError, RecursionError) as e:  # not JSON, or nested past the parser
        raise InvalidRequestError("chat.tools_json", f"is not valid JSON: {e}") from e


def _choice(request: router_pb2.RouterGenerateRequest) -> tuple[Any, str]:
    if not request.HasField("tool_choice"):
        return router_pb2.TOOL_CHOICE_MODE_AUTO, ""
    which = request.tool_choice.WhichOneof("choice")
    if which == "function_name":
        return router_pb2.TOOL_CHOICE_MODE_AUTO, request.tool_choice.function_name
    return request.tool_choice.mode, ""
