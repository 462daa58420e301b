"""``tool_choice``: validation, the JSON schemas constrained decoding enforces, and the parsers
of the outputs those schemas produce.

vLLM's approach (``_get_json_schema_from_tool``), which needs no model-specific format:

- ``required``: the output is a JSON array of ``{"name": ..., "parameters": {...}}``, at least
  one item (exactly one when ``parallel_tool_calls`` is false), each item one of the tools
  (``anyOf``, the name a ``const``). ``RequiredToolCallsParser`` reads it.
- named (``{"type": "function", "function": {"name": X}}``): the output IS X's arguments
  object, constrained by X's parameters schema; ``NamedToolCallParser`` turns it into one call.
- ``auto``/``none``: no constraint (``auto`` uses the ``--tool-call-parser`` on free text;
  ``none`` parses no calls).

Both parsers stream the same deltas as the free-text formats. Errors are InvalidRequestError
naming the field.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pdmesh.errors import InvalidRequestError
from pdmesh.parsers.json_scan import JsonValueScanner, skip_ws
from pdmesh.parsers.tool_calls.base import JsonSectionParser, SectionSyntax, ToolCallParser
from pdmesh.parsers.tool_spec import ToolsArg, ToolSpec

# the schema OpenAI assumes for a function declared without parameters
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"]
    function_name: str | None = None  # for mode "function"

    @property
    def constrained(self) -> bool:
        return self.mode in ("required", "function")


def validate_tool_choice(
    raw: object, tools: Sequence[ToolSpec], field_name: str = "tool_choice"
) -> ToolChoice:
    """The request's ``tool_choice`` against its (validated) ``tools``. Absent: ``auto`` when
    tools are given, else ``none`` (OpenAI's defaults)."""
    if raw is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(raw, str):
        if raw not in ("none", "auto", "required"):
            raise InvalidRequestError(
                field_name, f"must be 'none', 'auto', 'required' or a function, not {raw!r}"
            )
        if raw != "none" and not tools:
            raise InvalidRequestError(field_name, f"{raw!r} needs a non-empty 'tools'")
        return ToolChoice(raw)  # type: ignore[arg-type]
    if not isinstance(raw, Mapping):
        raise InvalidRequestError(field_name, "must be a string or an object")
    if raw.get("type") != "function":
        raise InvalidRequestError(f"{field_name}.type", "must be 'function'")
    function = raw.get("function")
    if not isinstance(function, Mapping):
        raise InvalidRequestError(f"{field_name}.function", "must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(f"{field_name}.function.name", "must be a non-empty string")
    if name not in {t.name for t in tools}:
        raise InvalidRequestError(
            f"{field_name}.function.name", f"no tool named {name!r} in 'tools'"
        )
    return ToolChoice("function", name)


def _parameters(tool: ToolSpec) -> dict[str, Any]:
    # a deep copy: the schema is handed to a grammar compiler and may be edited ($defs moved)
    params = (
        copy.deepcopy(dict(tool.parameters))
        if tool.parameters is not None
        else dict(_NO_PARAMETERS)
    )
    return _closed(params)


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else")


def _closed(schema: Any) -> Any:
    """``schema`` with every object that declares ``properties`` but says nothing of
    ``additionalProperties`` closed (false), in place. JSON Schema leaves such objects open,
    and a grammar that allows any extra key lets a small model keep inventing keys until
    max_tokens; the calls it still allows are the ones the function declares, all valid
    against the original schema (OpenAI's strict mode requires the same)."""
    if not isinstance(schema, dict):
        return schema
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for key in _SUBSCHEMA_MAPS:  # name -> schema
        if isinstance(schema.get(key), dict):
            for sub in schema[key].values():
                _closed(sub)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for sub in schema[key]:
                _closed(sub)
    for key in _SUBSCHEMAS:
        _closed(schema.get(key))
    return schema


def required_tool_calls_schema(
    tools: Sequence[ToolSpec], *, parallel_tool_calls: bool = True
) -> dict[str, Any]:
    """The JSON schema for ``tool_choice: "required"``."""
    if not tools:
        raise InvalidRequestError("tools", "'required' tool_choice needs at least one tool")
    defs: dict[str, Any] = {}
    items = []
    for i, tool in enumerate(tools):
        params = _parameters(tool)
        # "#/$defs/X" inside a tool's parameters means the root of *its* schema; nested under
        # the array it would point nowhere, so the definitions move to the root (as vLLM does)
        for name, definition in params.pop("$defs", {}).items():
            if name in defs and defs[name] != definition:
                raise InvalidRequestError(
                    f"tools[{i}].function.parameters.$defs.{name}",
                    "differs from another tool's definition of the same name",
                )
            defs[name] = definition
        items.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "const": tool.name},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    if defs:
        schema["$defs"] = defs
    return schema


def named_tool_call_schema(tools: Sequence[ToolSpec], function_name: str) -> dict[str, Any]:
    """The JSON schema for a named ``tool_choice``: that function's parameters."""
    for tool in tools:
        if tool.name == function_name:
            return _parameters(tool)
    raise InvalidRequestError("tool_choice.function.name", f"no tool named {function_name!r}")


def tool_choice_schema(
    tools: Sequence[ToolSpec], choice: ToolChoice, *, parallel_tool_calls: bool = True
) -> dict[str, Any] | None:
    """The schema to constrain the output with, or None (``auto``/``none``)."""
    if choice.mode == "required":
        return required_tool_calls_schema(tools, parallel_tool_calls=parallel_tool_calls)
    if choice.mode == "function":
        assert choice.function_name is not None
        return named_tool_call_schema(tools, choice.function_name)
    return None


def tool_choice_parser(tools: Sequence[ToolSpec], choice: ToolChoice) -> ToolCallParser | None:
    """A fresh parser of the constrained output, or None (``auto``/``none``: the caller uses
    its ``--tool-call-parser`` or none)."""
    if choice.mode == "required":
        return RequiredToolCallsParser(tools)
    if choice.mode == "function":
        assert choice.function_name is not None
        return NamedToolCallParser(tools, function_name=choice.function_name)
    return None


class RequiredToolCallsParser(JsonSectionParser):
    """The output of ``required_tool_calls_schema``: ``[{"name": ..., "parameters": {...}}]``."""

    name = "tool_choice_required"
    syntax = SectionSyntax(
        markers=(),
        open="[",
        separator=",",
        close="]",
        implicit_start=True,
        args_keys=("parameters", "arguments"),
    )


# states of NamedToolCallParser
_START = 0
_ARGS = 1
_TEXT = 2


class NamedToolCallParser(ToolCallParser):
    """The output of ``named_tool_call_schema``: one call to ``function_name`` whose arguments
    are the whole output (an object). Anything that is not (which the constraint prevents)
    is content; after the object, text is content too."""

    name = "tool_choice_function"

    def __init__(
        self, tools: ToolsArg = None, *, function_name: str, hold_calls: bool = False
    ) -> None:
        super().__init__(tools, hold_calls=hold_calls)
        if function_name not in self._names:
            raise InvalidRequestError(
                "tool_choice.function.name", f"no tool named {function_name!r}"
            )
        self.function_name = function_name
        self._state = _START
        self._scanner = JsonValueScanner()
        self._held: list[str] = []  # hold mode: the arguments text so far
        self._index = -1

    def _fresh(self, tools: ToolsArg) -> ToolCallParser:
        return NamedToolCallParser(tools, function_name=self.function_name, hold_calls=True)

    def _push(self, delta: str, final: bool) -> None:
        i = 0
        if self._state == _START:
            i = skip_ws(delta, 0)
            if i == len(delta):
                return  # leading whitespace is not part of the arguments
            if delta[i] != "{":
                self._state = _TEXT
            else:
                self._state = _ARGS
                if not self._hold:
                    self._index = self._emit_header(self.function_name)
        if self._state == _ARGS:
            end = self._scanner.push(delta, i)
            piece = delta[i : len(delta) if end < 0 else end]
            if self._hold:
                self._held.append(piece)
            else:
                self._emit_arguments(self._index, piece)
            if end >= 0:
                self._state, i = _TEXT, end
                self._end_object()
                self._strip_ws = True
            elif final and self._hold:
                self._emit_content("".join(self._held))  # cut off: not a call
                return
            else:
                return
        if self._state == _TEXT:
            self._emit_content(delta[i:])

    def _end_object(self) -> None:
        if not self._hold:
            return
        text = "".join(self._held)
        try:
            valid = isinstance(json.loads(text), dict)
        except ValueError:
            valid = False
        if valid:
            self._emit_arguments(self._emit_header(self.function_name), text)
        else:
            self._emit_content(text)
