"""Streamed answers: router pieces → the JSON events of each endpoint, in order.

Each function consumes the pieces of all choices and yields event bodies for ``sse``. Chat and
completions keep only what the end needs per choice (usage; the text length for logprob
offsets), so a chunk's work does not grow with the answer; SGLang's events carry the whole
text so far, so ``native_events`` keeps every choice's ``ChoiceResult``.

With ``encoded``, the content chunks (the hot ones: all but the first and the last few) come as
SSE bytes from ``ChunkTemplates``; without it every chunk is a dict, as ``openai_format`` builds
it, which is what the templates are checked against.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway import native_format, openai_format
from services.gateway.chunk_templates import ChunkTemplates
from services.gateway.generation import ChoiceResult, PieceStream, TokenLogprob, Usage, total_usage
from services.gateway.inbox import Inbox
from services.gateway.openai_format import ResponseMeta
from services.gateway.sse import Events
from services.gateway.token_text import TokenTexts

Pieces = PieceStream


@dataclass(frozen=True)
class StreamShape:
    num_choices: int
    choices_per_prompt: int  # n: usage counts each prompt once
    include_usage: bool
    logprobs: bool


async def chat_events(
    meta: ResponseMeta,
    pieces: Pieces,
    opts: StreamShape,
    texts: TokenTexts,
    *,
    encoded: bool = False,
) -> Events:
    usages = [Usage()] * opts.num_choices
    with_usage = opts.include_usage

    def content_chunk(index: int, text: str) -> dict[str, Any]:
        delta = {"content": text}
        return openai_format.chat_chunk(meta, index, delta, include_usage=with_usage)

    content = _content_events(content_chunk, encoded, pieces, opts.logprobs)
    async with contextlib.aclosing(pieces) as stream:
        for i in range(opts.num_choices):  # OpenAI opens each choice with the role
            delta = {"role": "assistant", "content": ""}
            yield openai_format.chat_chunk(meta, i, delta, include_usage=with_usage)
        async for piece in stream:
            if piece.usage is not None:
                usages[piece.index] = piece.usage
            if piece.reasoning:  # before the content it precedes
                delta = {"reasoning_content": piece.reasoning}
                yield openai_format.chat_chunk(meta, piece.index, delta, include_usage=with_usage)
            if (piece.text or piece.logprobs) and not opts.logprobs:
                yield content(piece.index, piece.text)
            elif piece.text or piece.logprobs:
                known = await texts.lookup(token_ids(piece.logprobs))
                yield openai_format.chat_chunk(
                    meta,
                    piece.index,
                    {"content": piece.text},
                    logprobs=openai_format.chat_logprobs(piece.logprobs, known),
                    include_usage=with_usage,
                )
            if piece.tool_calls:  # after the content before them
                calls = [openai_format.tool_call_delta(c) for c in piece.tool_calls]
                yield openai_format.chat_chunk(
                    meta, piece.index, {"tool_calls": calls}, include_usage=with_usage
                )
            if piece.finish_reason is not None:
                yield openai_format.chat_chunk(
                    meta,
                    piece.index,
                    {},
                    finish_reason=piece.finish_reason,
                    include_usage=with_usage,
                )
    if with_usage:
        usage = _total(usages, opts.choices_per_prompt)
        yield openai_format.usage_chunk(meta, "chat.completion.chunk", usage)


async def completion_events(
    meta: ResponseMeta,
    pieces: Pieces,
    opts: StreamShape,
    texts: TokenTexts,
    *,
    encoded: bool = False,
) -> Events:
    usages = [Usage()] * opts.num_choices
    lengths = [0] * opts.num_choices  # of each choice's text so far, for logprob offsets
    with_usage = opts.include_usage

    def content_chunk(index: int, text: str) -> dict[str, Any]:
        return openai_format.completion_chunk(meta, index, text, include_usage=with_usage)

    content = _content_events(content_chunk, encoded, pieces, opts.logprobs)
    async with contextlib.aclosing(pieces) as stream:
        async for piece in stream:
            offset = lengths[piece.index]
            lengths[piece.index] += len(piece.text)
            if piece.usage is not None:
                usages[piece.index] = piece.usage
            if not (piece.text or piece.logprobs or piece.finish_reason is not None):
                continue
            if piece.finish_reason is None and not opts.logprobs:
                yield content(piece.index, piece.text)
                continue
            logprobs = None
            if opts.logprobs:
                known = await texts.lookup(token_ids(piece.logprobs))
                logprobs = openai_format.completion_logprobs(piece.logprobs, known, offset)
            yield openai_format.completion_chunk(
                meta,
                piece.index,
                piece.text,
                finish_reason=piece.finish_reason,
                logprobs=logprobs,
                include_usage=with_usage,
            )
    if with_usage:
        usage = _total(usages, opts.choices_per_prompt)
        yield openai_format.usage_chunk(meta, "text_completion", usage)


ContentEvent = Callable[[int, str], dict[str, Any] | bytes]


def _content_events(
    chunk: Callable[[int, str], dict[str, Any]], encoded: bool, pieces: Pieces, logprobs: bool
) -> ContentEvent:
    """``chunk`` itself, or its events from templates (``encoded``). Encoded and without
    logprobs (a content chunk is then its text and nothing else), an inbox may write content
    chunks directly from the same templates (``inbox``'s doc)."""
    if not encoded:
        return chunk
    event = ChunkTemplates(chunk).event
    if not logprobs and isinstance(pieces, Inbox):
        pieces.direct_event(event)
    return event


def _total(usages: Sequence[Usage], choices_per_prompt: int) -> Usage:
    results = [ChoiceResult(i, usage=u) for i, u in enumerate(usages)]
    return total_usage(results, choices_per_prompt)


async def native_events(
    pieces: Pieces, request_ids: Sequence[str], start: float, logprobs: bool, texts: TokenTexts
) -> Events:
    """SGLang's stream: each event the whole choice so far; ``index`` added for batches.
    ``start``: when the request arrived (``time.monotonic()``), for ``e2e_latency``."""
    results = [ChoiceResult(i) for i in range(len(request_ids))]
    known: dict[int, str] = {}
    async with contextlib.aclosing(pieces) as stream:
        async for piece in stream:
            result = results[piece.index]
            result.add(piece)
            if logprobs:
                known.update(await texts.lookup(token_ids(piece.logprobs)))
            body = native_format.generate_result(
                result,
                request_ids[piece.index],
                time.monotonic() - start,
                known if logprobs else None,
            )
            if len(results) > 1:
                body["index"] = piece.index
            yield body


def token_ids(logprobs: Sequence[TokenLogprob]) -> set[int]:
    """Every id whose string a logprobs body shows: the sampled tokens and their alternatives."""
    ids = {lp.token_id for lp in logprobs}
    ids.update(t for lp in logprobs for t, _ in lp.top)
    return ids
