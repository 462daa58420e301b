"""The request's ``tools`` list, validated once into typed specs (OpenAI's shape).

Errors are ``InvalidRequestError`` naming the field (``tools[0].function.name``), so the
gateway can return them as 400s as they are.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdmesh.errors import InvalidRequestError

# OpenAI's rule for function names: a-z, A-Z, 0-9, underscores and dashes, at most 64
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolSpec:
    """One function tool."""

    name: str
    parameters: Mapping[str, Any] | None = None  # a JSON schema; None: no parameters given
    description: str | None = None
    strict: bool | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # other function fields, untouched


def validate_tools(raw: object, field_name: str = "tools") -> list[ToolSpec]:
    """``tools`` from a request (None → no tools) into specs; raises InvalidRequestError."""
    if raw is None:
        return []
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise InvalidRequestError(field_name, "must be an array of tools")
    specs: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(raw):
        where = f"{field_name}[{i}]"
        spec = tool if isinstance(tool, ToolSpec) else _tool_spec(tool, where)
        if spec.name in seen:
            raise InvalidRequestError(
                f"{where}.function.name", f"duplicate tool name {spec.name!r}"
            )
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _tool_spec(tool: object, where: str) -> ToolSpec:
    if not isinstance(tool, Mapping):
        raise InvalidRequestError(where, "must be an object")
    if tool.get("type", "function") != "function":
        raise InvalidRequestError(f"{where}.type", "only 'function' tools are supported")
    function = tool.get("function")
    if not isinstance(function, Mapping):
        raise InvalidRequestError(f"{where}.function", "must be an object")
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequestError(
            f"{where}.function.name",
            "must be a string of 1-64 letters, digits, underscores or dashes",
        )
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, Mapping):
        raise InvalidRequestError(f"{where}.function.parameters", "must be a JSON schema object")
    description = function.get("description")
    if description is not None and not isinstance(description, str):
        raise InvalidRequestError(f"{where}.function.description", "must be a string")
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"{where}.function.strict", "must be a boolean")
    extra = {
        k: v
        for k, v in function.items()
        if k not in ("name", "parameters", "description", "strict")
    }
    return ToolSpec(name, parameters, description, strict, extra)


ToolsArg = Sequence[ToolSpec | Mapping[str, Any]] | None


def as_tool_specs(tools: ToolsArg) -> list[ToolSpec]:
    """Specs as they are, or raw OpenAI tool dicts validated (the parsers accept either)."""
    if tools is not None and all(isinstance(t, ToolSpec) for t in tools):
        return list(tools)  # type: ignore[arg-type]
    return validate_tools(tools)
