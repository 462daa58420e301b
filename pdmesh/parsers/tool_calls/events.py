"""What tool-call parsers return: finished calls (non-streaming) and OpenAI-shaped deltas."""

from __future__ import annotations

import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

_ALNUM = string.ascii_letters + string.digits


def new_call_id() -> str:
    """``call_`` + 24 random letters/digits, like OpenAI's tool call ids."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments_json`` is the raw JSON text of the arguments object."""

    name: str
    arguments_json: str
    id: str = field(default_factory=new_call_id)

    def to_openai(self) -> dict[str, Any]:
        """The ``message.tool_calls[i]`` object of a non-streamed chat completion."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_json},
        }


@dataclass(frozen=True)
class ParsedToolCalls:
    """Non-streaming result: the text that is not a call, and the calls in order."""

    content: str
    calls: list[ToolCall]


@dataclass(frozen=True)
class ContentDelta:
    """Plain text for ``delta.content``."""

    text: str


@dataclass(frozen=True)
class FunctionDelta:
    name: str | None  # only in a call's first delta
    arguments: str  # "" in the first delta, then fragments of the arguments JSON


@dataclass(frozen=True)
class ToolCallDelta:
    """One entry of ``delta.tool_calls``. The first delta of a call carries ``id``, ``type``
    and ``function.name`` (with ``arguments: ""``); later ones ``index`` and fragments."""

    index: int
    function: FunctionDelta
    id: str | None = None
    type: Literal["function"] | None = None

    def to_openai(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out["id"] = self.id
        if self.type is not None:
            out["type"] = self.type
        function: dict[str, Any] = {"arguments": self.function.arguments}
        if self.function.name is not None:
            function = {"name": self.function.name, **function}
        out["function"] = function
        return out


ToolCallEvent = ContentDelta | ToolCallDelta


def assemble(events: list[ToolCallEvent]) -> ParsedToolCalls:
    """Fold streamed events back into the non-streaming shape (what clients do with deltas)."""
    content: list[str] = []
    names: dict[int, str] = {}
    ids: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ContentDelta):
            content.append(event.text)
            continue
        if event.function.name is not None:
            names[event.index] = event.function.name
            ids[event.index] = event.id or new_call_id()
        args.setdefault(event.index, []).append(event.function.arguments)
    calls = [ToolCall(names[i], "".join(args[i]), ids[i]) for i in sorted(names)]
    return ParsedToolCalls("".join(content), calls)
