"""``/v1/responses`` over the chat path: a Responses request is a chat request (instructions →
system message, items → messages, flat tools → chat tools), and the router's pieces become
Response output items and, streamed, the Responses API's typed events.

``ResponseBuilder`` is the one place items are made: it is fed pieces in order and both yields
the events of a stream and holds the items, so the ``response.completed`` event and a
non-streamed body list the same items with the same ids.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from services.gateway.errors import APIError
from services.gateway.generation import Piece, PieceStream, Usage
from services.gateway.openai_schema import ChatCompletionRequest
from services.gateway.responses_schema import (
    FunctionCallItem,
    FunctionCallOutputItem,
    JSONSchemaTextFormat,
    MessageItem,
    ResponsesRequest,
)

Event = dict[str, Any]


def chat_request(body: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that generates this response (validated as a chat body would be)."""
    if body.store:
        raise APIError(400, "store: responses are not stored; send false or leave it out")
    chat: dict[str, Any] = {"model": body.model, "messages": _messages(body)}
    if body.tools is not None:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude_none=True, exclude={"type"})}
            for t in body.tools
        ]
    if body.tool_choice is not None:
        choice = body.tool_choice
        chat["tool_choice"] = (
            choice
            if isinstance(choice, str)
            else {"type": "function", "function": {"name": choice.name}}
        )
    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, JSONSchemaTextFormat):
        spec = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
        chat["response_format"] = {"type": "json_schema", "json_schema": spec}
    elif fmt is not None:
        chat["response_format"] = {"type": fmt.type}
    if body.include:  # message.output_text.logprobs, the only one allowed
        chat["logprobs"] = True
        chat["top_logprobs"] = body.top_logprobs or 0
    for name, value in (
        ("max_completion_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("parallel_tool_calls", body.parallel_tool_calls),
    ):
        if value is not None:
            chat[name] = value
    return ChatCompletionRequest.model_validate(chat)


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    for item in body.input:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            # consecutive calls (and the text before them) are one assistant turn
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutputItem):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
        # reasoning items: left out of the prompt
    if not messages:
        raise APIError(400, "input: must contain at least one message", param="input")
    return messages


@dataclass
class ResponseMeta:
    id: str  # "resp_<request id>"
    model: str
    created_at: int
    request: Mapping[str, Any]  # the request's echoed settings (tools, tool_choice, ...)


@dataclass
class _Item:
    """One output item being built; ``body`` is its JSON form."""

    body: dict[str, Any]
    text: str = ""  # message: its output text; reasoning: its text; function_call: arguments


@dataclass
class ResponseBuilder:
    """Pieces of the one choice → output items (and the events that announce them)."""

    meta: ResponseMeta
    items: list[_Item] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    _open: _Item | None = None  # the message or reasoning item text goes to now
    _calls: dict[int, _Item] = field(default_factory=dict)  # tool-call index → its item
    _seq: int = 0

    def start(self) -> Iterator[Event]:
        yield self._event("response.created", response=self.body("in_progress"))
        yield self._event("response.in_progress", response=self.body("in_progress"))

    def feed(self, piece: Piece) -> Iterator[Event]:
        if piece.reasoning:
            yield from self._text("reasoning", piece.reasoning)
        if piece.text:
            yield from self._text("message", piece.text)
        for delta in piece.tool_calls:
            item = self._calls.get(delta.index)
            if item is None:
                yield from self._close()
                item = self._add(
                    {
                        "type": "function_call",
                        "id": f"fc_{delta.id.removeprefix('call_')}",
                        "call_id": delta.id,
                        "name": delta.name,
                        "arguments": "",
                        "status": "in_progress",
                    }
                )
                self._calls[delta.index] = item
                yield self._event("response.output_item.added", **self._where(item), item=item.body)
            if delta.arguments:
                item.text += delta.arguments
                yield self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.body["id"],
                    output_index=self.items.index(item),
                    delta=delta.arguments,
                )
        if piece.usage is not None:
            self.usage = piece.usage
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason

    def finish(self) -> Iterator[Event]:
        yield from self._close()
        for item in self._calls.values():
            item.body.update(arguments=item.text, status="completed")
            yield self._event(
                "response.function_call_arguments.done",
                item_id=item.body["id"],
                output_index=self.items.index(item),
                arguments=item.text,
            )
            yield self._event("response.output_item.done", **self._where(item), item=item.body)
        self._calls.clear()
        status = "incomplete" if self.finish_reason == "length" else "completed"
        yield self._event(f"response.{status}", response=self.body(status))

    def body(self, status: str) -> dict[str, Any]:
        """The Response object (OpenAI's fields; usage and items as built so far)."""
        done = status != "in_progress"
        return {
            "id": self.meta.id,
            "object": "response",
            "created_at": self.meta.created_at,
            "status": status,
            "model": self.meta.model,
            "output": [item.body for item in self.items] if done else [],
            "error": None,
            "incomplete_details": (
                {"reason": "max_output_tokens"} if status == "incomplete" else None
            ),
            "usage": _usage(self.usage) if done else None,
            **self.meta.request,
        }

    # -- items -------------------------------------------------------------------------------

    def _text(self, kind: str, text: str) -> Iterator[Event]:
        item = self._open
        if item is None or item.body["type"] != kind:
            yield from self._close()
            item = self._open = self._open_item(kind)
            yield self._event("response.output_item.added", **self._where(item), item=item.body)
            if kind == "message":
                yield self._event(
                    "response.content_part.added", **self._part(item), part=_output_text("")
                )
        item.text += text
        name = (
            "response.output_text.delta" if kind == "message" else "response.reasoning_text.delta"
        )
        extra: dict[str, Any] = {"logprobs": []} if kind == "message" else {}
        yield self._event(name, **self._part(item), delta=text, **extra)

    def _open_item(self, kind: str) -> _Item:
        suffix = self.meta.id.removeprefix("resp_")
        n = sum(1 for i in self.items if i.body["type"] == kind)
        tail = f"{suffix}_{n}" if n else suffix
        if kind == "message":
            body = {
                "type": "message",
                "id": f"msg_{tail}",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
        else:
            body = {"type": "reasoning", "id": f"rs_{tail}", "summary": [], "content": []}
        return self._add(body)

    def _close(self) -> Iterator[Event]:
        item, self._open = self._open, None
        if item is None:
            return
        if item.body["type"] == "message":
            part = _output_text(item.text)
            item.body.update(content=[part], status="completed")
            yield self._event("response.output_text.done", **self._part(item), text=item.text)
            yield self._event("response.content_part.done", **self._part(item), part=part)
        else:
            item.body["content"] = [{"type": "reasoning_text", "text": item.text}]
            yield self._event("response.reasoning_text.done", **self._part(item), text=item.text)
        yield self._event("response.output_item.done", **self._where(item), item=item.body)

    def _add(self, body: dict[str, Any]) -> _Item:
        item = _Item(body)
        self.items.append(item)
        return item

    def _where(self, item: _Item) -> dict[str, Any]:
        return {"output_index": self.items.index(item)}

    def _part(self, item: _Item) -> dict[str, Any]:
        return {
            "item_id": item.body["id"],
            "output_index": self.items.index(item),
            "content_index": 0,
        }

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._seq, **fields}
        self._seq += 1
        return event


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }


def echoed_settings(body: ResponsesRequest) -> dict[str, Any]:
    """What a Response repeats of its request (OpenAI's fields, with their defaults)."""
    fmt = body.text.format if body.text is not None else None
    return {
        "instructions": body.instructions,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
        "tool_choice": (
            body.tool_choice.model_dump()
            if body.tool_choice is not None and not isinstance(body.tool_choice, str)
            else body.tool_choice or "auto"
        ),
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "max_output_tokens": body.max_output_tokens,
        "text": {"format": fmt.model_dump(by_alias=True) if fmt else {"type": "text"}},
        "truncation": "disabled",
        "store": False,
        "metadata": body.metadata or {},
        "previous_response_id": None,
    }


async def collect_response(builder: ResponseBuilder, pieces: PieceStream) -> dict[str, Any]:
    async with contextlib.aclosing(pieces) as stream:
        async for piece in stream:
            for _ in builder.feed(piece):
                pass
    events = list(builder.finish())
    return dict(events[-1]["response"])


async def response_events(
    builder: ResponseBuilder, pieces: PieceStream
) -> AsyncGenerator[bytes, None]:
    """The stream's SSE events: ``event: <type>`` and ``data: <json>``, as OpenAI sends them."""
    for event in builder.start():
        yield encode(event)
    async with contextlib.aclosing(pieces) as stream:
        async for piece in stream:
            for event in builder.feed(piece):
                yield encode(event)
    for event in builder.finish():
        yield encode(event)


def encode(event: Event) -> bytes:
    payload = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return b"event: " + event["type"].encode() + b"\ndata: " + payload.encode("utf-8") + b"\n\n"
