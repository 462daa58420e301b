"""What the gateway makes of the router's output, free of protobuf and HTTP.

A request with ``n`` choices (or a batch of prompts) is several router requests; their
``Piece``s arrive in one ``PieceStream`` (``inbox.Inbox``), each tagged with its choice index,
and ``collect`` folds pieces into one ``ChoiceResult`` per choice for non-streamed answers.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of one tool call (the router parsed it out of the text): the first piece of a
    call has its id and name, the next ones more of its arguments' JSON text."""

    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCall:
    """One whole tool call, accumulated from its deltas."""

    id: str
    name: str
    arguments: str = ""


@dataclass(frozen=True)
class Piece:
    """One router message of one choice: the text and tokens produced since the last one."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    # "stop" | "length" | "tool_calls" | "abort" on the last piece only
    finish_reason: str | None = None
    matched_stop: str | None = None
    usage: Usage | None = None  # on the last piece only
    reasoning: str = ""  # a reasoning model's thinking, when the router separates it
    tool_calls: tuple[ToolCallDelta, ...] = ()


@dataclass
class ChoiceResult:
    """A whole choice, accumulated from its pieces."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    matched_stop: str | None = None
    usage: Usage = field(default_factory=Usage)
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.reasoning += piece.reasoning
        self.token_ids.extend(piece.token_ids)
        self.logprobs.extend(piece.logprobs)
        for delta in piece.tool_calls:
            if delta.index == len(self.tool_calls):  # a call's first delta
                self.tool_calls.append(ToolCall(delta.id, delta.name))
            self.tool_calls[delta.index].arguments += delta.arguments
        if piece.finish_reason is not None:
            self.finish_reason = piece.finish_reason
            self.matched_stop = piece.matched_stop
        if piece.usage is not None:
            self.usage = piece.usage


class PieceStream(Protocol):
    """The pieces of one HTTP request's choices as they arrive: an ``inbox.Inbox`` (what the
    router client gives), or any async generator of pieces."""

    def __aiter__(self) -> AsyncIterator[Piece]: ...

    def __anext__(self) -> Awaitable[Piece]: ...

    def aclose(self) -> Awaitable[None]:
        """Stop whatever still produces pieces."""
        ...


class GenerationError(Exception):
    """The router reported a failed generation in-band (FINISH_REASON_ERROR)."""


async def collect(pieces: PieceStream, num_choices: int) -> list[ChoiceResult]:
    """Every choice in full (for non-streamed answers)."""
    results = [ChoiceResult(index=i) for i in range(num_choices)]
    async with contextlib.aclosing(pieces) as stream:
        async for piece in stream:
            results[piece.index].add(piece)
    return results


def total_usage(results: Sequence[ChoiceResult], choices_per_prompt: int) -> Usage:
    """OpenAI counts the prompt once per prompt, not once per choice; completions add up."""
    prompts = results[::choices_per_prompt]
    return Usage(
        prompt_tokens=sum(r.usage.prompt_tokens for r in prompts),
        completion_tokens=sum(r.usage.completion_tokens for r in results),
        cached_tokens=sum(r.usage.cached_tokens for r in prompts),
    )
