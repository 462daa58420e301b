"""Response bodies of SGLang's native ``/generate``, as plain dicts ready for JSON.

SGLang's shape: ``{"text", "output_ids", "meta_info": {"id", "finish_reason", "prompt_tokens",
"completion_tokens", "cached_tokens", "e2e_latency", ...}}``; while streaming, every event
carries the text *so far* (not a delta) and ``finish_reason`` is null until the last one, as
SGLang's own clients (e.g. ``bench_serving``) expect.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.gateway.generation import ChoiceResult, TokenLogprob


def generate_result(
    result: ChoiceResult,
    request_id: str,
    latency_s: float,
    texts: Mapping[int, str] | None,
) -> dict[str, Any]:
    """``texts`` is given when the request asked for logprobs (``return_logprob``)."""
    meta: dict[str, Any] = {
        "id": request_id,
        "finish_reason": finish_reason(result),
        "prompt_tokens": result.usage.prompt_tokens,
        "completion_tokens": result.usage.completion_tokens or len(result.token_ids),
        "cached_tokens": result.usage.cached_tokens,
        "e2e_latency": round(latency_s, 6),
    }
    if texts is not None:
        meta["output_token_logprobs"] = [
            _entry(lp.token_id, lp.logprob, texts) for lp in result.logprobs
        ]
        meta["output_top_logprobs"] = [_top(lp, texts) for lp in result.logprobs]
    return {"text": result.text, "output_ids": list(result.token_ids), "meta_info": meta}


def finish_reason(result: ChoiceResult) -> dict[str, Any] | None:
    reason = result.finish_reason
    if reason is None:
        return None
    if reason == "stop":
        # SGLang names what matched: the stop string, else the stop/EOS token
        matched: str | int | None = result.matched_stop
        if matched is None and result.token_ids:
            matched = result.token_ids[-1]
        return {"type": "stop", "matched": matched}
    if reason == "length":
        return {"type": "length", "length": result.usage.completion_tokens}
    return {"type": reason, "message": f"request {reason}ed"}


def _entry(token_id: int, logprob: float, texts: Mapping[int, str]) -> list[Any]:
    # SGLang's triple: (logprob, token id, token text)
    return [logprob, token_id, texts[token_id]]


def _top(lp: TokenLogprob, texts: Mapping[int, str]) -> list[list[Any]]:
    return [_entry(t, p, texts) for t, p in lp.top]
