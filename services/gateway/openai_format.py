"""Response bodies of the OpenAI-compatible endpoints, as plain dicts ready for JSON.

Pure functions over ``generation`` values; token strings for logprobs come in already resolved
(``texts``: token id → string), so nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.gateway.generation import ChoiceResult, TokenLogprob, ToolCallDelta, Usage


@dataclass(frozen=True)
class ResponseMeta:
    """What every body and chunk of one response repeats."""

    id: str  # "chatcmpl-<request id>" / "cmpl-<request id>"
    model: str
    created: int  # unix seconds


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


# -- chat -------------------------------------------------------------------------------------


def chat_completion(
    meta: ResponseMeta,
    results: Sequence[ChoiceResult],
    usage: Usage,
    texts: Mapping[int, str],
    logprobs: bool,
) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": r.index,
                "message": chat_message(r),
                "logprobs": chat_logprobs(r.logprobs, texts) if logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ],
        "usage": usage_dict(usage),
    }


def chat_message(r: ChoiceResult) -> dict[str, Any]:
    """The assistant message of one choice. OpenAI's: ``content`` null when the answer is only
    tool calls; ``tool_calls`` only when there are some; ``reasoning_content`` (SGLang's,
    vLLM's and DeepSeek's field) only when the router separated reasoning."""
    message: dict[str, Any] = {"role": "assistant", "content": r.text}
    if r.tool_calls:
        message["content"] = r.text or None
        message["tool_calls"] = [tool_call_dict(c.id, c.name, c.arguments) for c in r.tool_calls]
    if r.reasoning:
        message["reasoning_content"] = r.reasoning
    return message


def tool_call_dict(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_call_delta(delta: ToolCallDelta) -> dict[str, Any]:
    """One tool-call delta as OpenAI streams it: the first of a call with id, type and name
    (and ``arguments`` so far, at least ""), the next ones with only the index and more
    arguments."""
    if delta.id:
        return {"index": delta.index, **tool_call_dict(delta.id, delta.name, delta.arguments)}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


def chat_chunk(
    meta: ResponseMeta,
    index: int,
    delta: dict[str, Any],
    *,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk = _chunk(meta, "chat.completion.chunk", include_usage)
    chunk["choices"] = [
        {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    ]
    return chunk


def chat_logprobs(logprobs: Sequence[TokenLogprob], texts: Mapping[int, str]) -> dict[str, Any]:
    return {
        "content": [
            {
                **_token_entry(lp.token_id, lp.logprob, texts),
                "top_logprobs": [_token_entry(t, p, texts) for t, p in lp.top],
            }
            for lp in logprobs
        ]
    }


def _token_entry(token_id: int, logprob: float, texts: Mapping[int, str]) -> dict[str, Any]:
    text = texts[token_id]
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


# -- completions ------------------------------------------------------------------------------


def completion(
    meta: ResponseMeta,
    results: Sequence[ChoiceResult],
    usage: Usage,
    texts: Mapping[int, str],
    logprobs: bool,
) -> dict[str, Any]:
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "choices": [
            {
                "index": r.index,
                "text": r.text,
                "logprobs": completion_logprobs(r.logprobs, texts, 0) if logprobs else None,
                "finish_reason": r.finish_reason,
            }
            for r in results
        ],
        "usage": usage_dict(usage),
    }


def completion_chunk(
    meta: ResponseMeta,
    index: int,
    text: str,
    *,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    include_usage: bool = False,
) -> dict[str, Any]:
    chunk = _chunk(meta, "text_completion", include_usage)
    chunk["choices"] = [
        {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    ]
    return chunk


def completion_logprobs(
    logprobs: Sequence[TokenLogprob], texts: Mapping[int, str], text_offset: int
) -> dict[str, Any]:
    """The legacy completions shape; ``text_offset`` is where the first token starts in the
    choice's text."""
    offsets = []
    for lp in logprobs:
        offsets.append(text_offset)
        text_offset += len(texts[lp.token_id])
    return {
        "tokens": [texts[lp.token_id] for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{texts[t]: p for t, p in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


# -- both -------------------------------------------------------------------------------------


def usage_chunk(meta: ResponseMeta, obj: str, usage: Usage) -> dict[str, Any]:
    """The extra last chunk of ``stream_options.include_usage``: no choices, just usage."""
    chunk = _chunk(meta, obj, include_usage=False)
    chunk["choices"] = []
    chunk["usage"] = usage_dict(usage)
    return chunk


def _chunk(meta: ResponseMeta, obj: str, include_usage: bool) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": meta.id,
        "object": obj,
        "created": meta.created,
        "model": meta.model,
    }
    if include_usage:  # OpenAI: with include_usage, every other chunk has "usage": null
        chunk["usage"] = None
    return chunk


def model_card(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "pdmesh"}
