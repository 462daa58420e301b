"""Streamed answers: router pieces → the JSON events of each endpoint, in order.

Each function consumes the merged pieces of all choices and yields event bodies for ``sse``;
they keep every choice's running ``ChoiceResult``, which gives usage at the end and SGLang's
cumulative text.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway import native_format, openai_format
from services.gateway.generation import ChoiceResult, Piece, TokenLogprob, total_usage
from services.gateway.openai_format import ResponseMeta
from services.gateway.token_text import TokenTexts

Events = AsyncGenerator[dict[str, Any], None]
Pieces = AsyncGenerator[Piece, None]


@dataclass(frozen=True)
class StreamShape:
    num_choices: int
    choices_per_prompt: int  # n: usage counts each prompt once
    include_usage: bool
    logprobs: bool


async def chat_events(
    meta: ResponseMeta, pieces: Pieces, opts: StreamShape, texts: TokenTexts
) -> Events:
    results = [ChoiceResult(i) for i in range(opts.num_choices)]
    with_usage = opts.include_usage
    async with contextlib.aclosing(pieces) as stream:
        for i in range(opts.num_choices):  # OpenAI opens each choice with the role
            delta = {"role": "assistant", "content": ""}
            yield openai_format.chat_chunk(meta, i, delta, include_usage=with_usage)
        async for piece in stream:
            results[piece.index].add(piece)
            if piece.text or piece.logprobs:
                logprobs = None
                if opts.logprobs:
                    known = await texts.lookup(token_ids(piece.logprobs))
                    logprobs = openai_format.chat_logprobs(piece.logprobs, known)
                delta = {"content": piece.text}
                yield openai_format.chat_chunk(
                    meta, piece.index, delta, logprobs=logprobs, include_usage=with_usage
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
        usage = total_usage(results, opts.choices_per_prompt)
        yield openai_format.usage_chunk(meta, "chat.completion.chunk", usage)


async def completion_events(
    meta: ResponseMeta, pieces: Pieces, opts: StreamShape, texts: TokenTexts
) -> Events:
    results = [ChoiceResult(i) for i in range(opts.num_choices)]
    with_usage = opts.include_usage
    async with contextlib.aclosing(pieces) as stream:
        async for piece in stream:
            offset = len(results[piece.index].text)
            results[piece.index].add(piece)
            if piece.text or piece.logprobs or piece.finish_reason is not None:
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
        usage = total_usage(results, opts.choices_per_prompt)
        yield openai_format.usage_chunk(meta, "text_completion", usage)


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
