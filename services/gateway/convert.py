"""HTTP request bodies → router protos, and router messages → ``generation.Piece``s.

The only module that builds or reads ``pdmesh.v1`` messages for the HTTP side. Sampling fields
are copied only when the client gave them: proto3 ``optional`` keeps "unset" distinct from
zero, so the worker's defaults apply to whatever the client left out.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from pdmesh.v1 import common_pb2, router_pb2
from services.gateway.errors import APIError
from services.gateway.generation import (
    GenerationError,
    Piece,
    TokenLogprob,
    ToolCallDelta,
    Usage,
)
from services.gateway.native_schema import GenerateRequest
from services.gateway.openai_schema import (
    MAX_CHOICES,
    MAX_INT32,
    MAX_SEED,
    MAX_STOP_STRINGS,
    ChatCompletionRequest,
    CompletionRequest,
    Prompt,
    ResponseFormat,
    ResponseFormatJSONObject,
    ResponseFormatJSONSchema,
    SamplingFields,
)
from services.gateway.text_check import check_text

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}

# what a logprob that is not a finite number is reported as (vLLM's convention)
MIN_LOGPROB = -9999.0

# The router input of one prompt: one of the RouterGenerateRequest.input oneof's fields.
PromptInput = dict[str, Any]


def chat_requests(
    body: ChatCompletionRequest, request_id: str
) -> list[router_pb2.RouterGenerateRequest]:
    check_text(body)
    chat = common_pb2.ChatRequest(messages=[_chat_message(m) for m in body.messages])
    if body.tools is not None:
        chat.tools_json = json.dumps([t.model_dump(exclude_none=True) for t in body.tools])
    if body.chat_template_kwargs is not None:
        chat.template_kwargs_json = json.dumps(body.chat_template_kwargs)
    if body.continue_final_message:
        chat.continue_final_message = True
        chat.add_generation_prompt = False  # what continuing means; true is refused downstream
    if body.add_generation_prompt is not None:
        chat.add_generation_prompt = body.add_generation_prompt
    if body.top_logprobs is not None and not body.logprobs:
        raise APIError(400, "top_logprobs: requires logprobs to be true", param="top_logprobs")
    params = openai_sampling(body, body.max_new_tokens)
    if body.logprobs:
        params.logprobs = True
        params.top_logprobs = body.top_logprobs or 0
    if body.response_format is not None:
        _set_response_format(params, body.response_format)
    options = _chat_options(body)
    return fan_out([{"chat": chat, **options}], params, body.n, body.seed, request_id)


def _chat_options(body: ChatCompletionRequest) -> dict[str, Any]:
    """The RouterGenerateRequest fields of tool calling and reasoning (the router parses)."""
    options: dict[str, Any] = {}
    choice = body.tool_choice
    if choice is not None:
        if body.tools is None and choice != "none":
            raise APIError(400, "tool_choice: given without tools", param="tool_choice")
        if isinstance(choice, str):
            mode = TOOL_CHOICE_MODES[choice]
            options["tool_choice"] = router_pb2.ToolChoice(mode=mode)
        else:
            names = [t.function.name for t in body.tools or ()]
            if choice.function.name not in names:
                raise APIError(
                    400,
                    f"tool_choice.function.name: {choice.function.name!r} is not one of the "
                    f"tools ({', '.join(names)})",
                    param="tool_choice.function.name",
                )
            options["tool_choice"] = router_pb2.ToolChoice(function_name=choice.function.name)
    if body.parallel_tool_calls is not None:
        options["parallel_tool_calls"] = body.parallel_tool_calls
    if body.separate_reasoning is not None:
        options["separate_reasoning"] = body.separate_reasoning
    return options


TOOL_CHOICE_MODES = {
    "auto": router_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": router_pb2.TOOL_CHOICE_MODE_NONE,
    "required": router_pb2.TOOL_CHOICE_MODE_REQUIRED,
}


def _set_response_format(params: common_pb2.SamplingParams, fmt: ResponseFormat) -> None:
    """``response_format`` as the worker's constrained decoding (a JSON schema)."""
    if isinstance(fmt, ResponseFormatJSONObject):
        params.json_schema = json.dumps({"type": "object"})
    elif isinstance(fmt, ResponseFormatJSONSchema):
        schema = fmt.json_schema.schema_
        # OpenAI's json_schema without a schema: any JSON object, as json_object
        params.json_schema = json.dumps(schema if schema is not None else {"type": "object"})


def completion_requests(
    body: CompletionRequest, request_id: str
) -> list[router_pb2.RouterGenerateRequest]:
    check_text(body)
    if body.echo:
        raise APIError(400, "echo: not supported", param="echo")
    params = openai_sampling(body, body.max_new_tokens)
    if body.logprobs is not None:
        params.logprobs = True
        params.top_logprobs = body.logprobs
    return fan_out(prompt_inputs(body.prompt, "prompt"), params, body.n, body.seed, request_id)


def native_requests(
    body: GenerateRequest, request_id: str
) -> list[router_pb2.RouterGenerateRequest]:
    check_text(body)
    prompt: Prompt
    if body.text is not None and body.input_ids is None:
        prompt, field = body.text, "text"
    elif body.input_ids is not None and body.text is None:
        prompt, field = body.input_ids, "input_ids"
    else:
        raise APIError(400, "give exactly one of text and input_ids", param="text")
    sp = body.sampling_params
    params = _sampling(
        max_new_tokens=sp.max_new_tokens,
        min_new_tokens=sp.min_new_tokens,
        temperature=sp.temperature,
        top_p=sp.top_p,
        top_k=sp.top_k,
        min_p=sp.min_p,
        frequency_penalty=sp.frequency_penalty,
        presence_penalty=sp.presence_penalty,
        repetition_penalty=sp.repetition_penalty,
        ignore_eos=sp.ignore_eos,
        skip_special_tokens=sp.skip_special_tokens,
        detokenize=sp.detokenize,
        json_schema=sp.json_schema,
        regex=sp.regex,
        ebnf=sp.ebnf,
    )
    _set_stops(params, sp.stop, sp.stop_token_ids, "sampling_params.stop")
    _set_logit_bias(params, sp.logit_bias, "sampling_params.logit_bias")
    if body.return_logprob:
        params.logprobs = True
        params.top_logprobs = body.top_logprobs_num
    return fan_out(
        prompt_inputs(prompt, field), params, sp.n, sp.sampling_seed, body.rid or request_id
    )


def openai_sampling(body: SamplingFields, max_new_tokens: int | None) -> common_pb2.SamplingParams:
    params = _sampling(
        max_new_tokens=max_new_tokens,
        min_new_tokens=body.min_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens,
    )
    _set_stops(params, body.stop, body.stop_token_ids, "stop")
    _set_logit_bias(params, body.logit_bias, "logit_bias")
    return params


def _set_logit_bias(
    params: common_pb2.SamplingParams, bias: dict[str, float] | None, field: str
) -> None:
    """OpenAI's token-id keys are JSON strings; the worker checks them against the vocabulary."""
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"{field}: key {key!r} is not a token id", param=field) from None
        if not 0 <= token <= MAX_INT32:
            raise APIError(400, f"{field}: token id {token} is out of range", param=field)
        params.logit_bias[token] = value


def _sampling(**given: Any) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**{k: v for k, v in given.items() if v is not None})


def _set_stops(
    params: common_pb2.SamplingParams,
    stop: str | list[str] | None,
    stop_token_ids: list[int] | None,
    field: str,
) -> None:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"{field}: at most {MAX_STOP_STRINGS} stop strings", param=field)
    if any(not s for s in stops):
        raise APIError(400, f"{field}: stop strings must not be empty", param=field)
    params.stop.extend(stops)
    params.stop_token_ids.extend(stop_token_ids or [])


def prompt_inputs(prompt: Prompt, field: str) -> list[PromptInput]:
    """One router input per prompt: a string, a list of strings (a batch), a token-id list, or
    a list of token-id lists (a batch)."""
    if isinstance(prompt, str):
        return [{"text": prompt}]
    if not prompt:
        raise APIError(400, f"{field}: must not be empty", param=field)
    texts = [p for p in prompt if isinstance(p, str)]
    if len(texts) == len(prompt):
        return [{"text": t} for t in texts]
    ids = [p for p in prompt if isinstance(p, int)]
    if len(ids) == len(prompt):
        return [{"token_ids": router_pb2.TokenIds(ids=ids)}]
    inputs: list[PromptInput] = []
    for i, one in enumerate(prompt):
        if not isinstance(one, list) or not one:
            raise APIError(400, f"{field}[{i}]: must be a non-empty token-id list", param=field)
        inputs.append({"token_ids": router_pb2.TokenIds(ids=one)})
    return inputs


def fan_out(
    inputs: Sequence[PromptInput],
    params: common_pb2.SamplingParams,
    n: int,
    seed: int | None,
    request_id: str,
) -> list[router_pb2.RouterGenerateRequest]:
    """``n`` router requests per prompt; choice ``i`` of a prompt gets seed ``seed + i`` (so
    the choices differ, yet each is reproducible) and request id ``<id>-<k>`` when there are
    several (the worker needs them unique)."""
    total = len(inputs) * n
    if total > MAX_CHOICES:
        raise APIError(
            400,
            f"{len(inputs)} prompts x n={n} make {total} choices; at most {MAX_CHOICES} per "
            "request",
            param="n",
        )
    requests = []
    for p, prompt in enumerate(inputs):
        for i in range(n):
            k = p * n + i
            choice_params = common_pb2.SamplingParams()
            choice_params.CopyFrom(params)
            if seed is not None:
                choice_params.seed = (seed + i) % (MAX_SEED + 1)
            rid = request_id if total == 1 else f"{request_id}-{k}"
            requests.append(
                router_pb2.RouterGenerateRequest(
                    request_id=rid, sampling_params=choice_params, **prompt
                )
            )
    return requests


def _chat_message(m: Any) -> common_pb2.ChatMessage:
    pb = common_pb2.ChatMessage(role=m.role)
    if (text := m.text) is not None:
        pb.content = text
    if m.name is not None:
        pb.name = m.name
    if m.tool_calls is not None:
        pb.tool_calls_json = json.dumps([c.model_dump() for c in m.tool_calls])
    if m.tool_call_id is not None:
        pb.tool_call_id = m.tool_call_id
    return pb


def piece_from_pb(index: int, pb: router_pb2.RouterGenerateResponse) -> Piece:
    # once per SSE chunk: each field read once, nothing built for what is not there
    reason = pb.finish_reason
    if reason == common_pb2.FINISH_REASON_ERROR:
        raise GenerationError(pb.error if pb.HasField("error") else "generation failed")
    finished = reason != common_pb2.FINISH_REASON_UNSPECIFIED
    logprobs = pb.logprobs
    return Piece(
        index,
        pb.text,
        tuple(pb.token_ids),
        tuple([_logprob(lp) for lp in logprobs]) if logprobs else (),
        FINISH_REASONS.get(reason) if finished else None,
        pb.matched_stop if finished and pb.HasField("matched_stop") else None,
        _usage(pb.usage) if finished else None,
        pb.reasoning_text,
        _merged_tool_calls((pb,)) if pb.tool_calls else (),
    )


def piece_from_pbs(index: int, pbs: Sequence[router_pb2.RouterGenerateResponse]) -> Piece:
    """Several router messages of one choice as one piece: text and tokens joined, the last
    message's finish reason, stop string and usage (only a last message has them). None of
    them may be an in-band failure (``Output.add`` takes those out)."""
    if len(pbs) == 1:
        return piece_from_pb(index, pbs[0])
    last = pbs[-1]
    finished = last.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    return Piece(
        index=index,
        text="".join([pb.text for pb in pbs]),
        token_ids=tuple([t for pb in pbs for t in pb.token_ids]),
        logprobs=tuple([_logprob(lp) for pb in pbs for lp in pb.logprobs]),
        finish_reason=FINISH_REASONS.get(last.finish_reason) if finished else None,
        matched_stop=last.matched_stop if last.HasField("matched_stop") else None,
        usage=_usage(last.usage) if finished else None,
        reasoning="".join([pb.reasoning_text for pb in pbs]),
        tool_calls=_merged_tool_calls(pbs),
    )


def _tool_call(pb: router_pb2.ToolCallDelta) -> ToolCallDelta:
    return ToolCallDelta(pb.index, pb.id, pb.name, pb.arguments)


def _merged_tool_calls(
    pbs: Sequence[router_pb2.RouterGenerateResponse],
) -> tuple[ToolCallDelta, ...]:
    """The tool-call deltas of several messages, one per call: a call's id and name from its
    first delta, its argument fragments joined (a slow reader gets each call in one chunk)."""
    merged: dict[int, ToolCallDelta] = {}
    for pb in pbs:
        for c in pb.tool_calls:
            had = merged.get(c.index)
            merged[c.index] = (
                _tool_call(c)
                if had is None
                else ToolCallDelta(c.index, had.id, had.name, had.arguments + c.arguments)
            )
    return tuple(merged.values())


def _logprob(pb: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(
        token_id=pb.token_id,
        logprob=_finite(pb.logprob),
        top=tuple((t.token_id, _finite(t.logprob)) for t in pb.top),
    )


def _finite(logprob: float) -> float:
    """``logprob``, or ``MIN_LOGPROB`` for -inf / NaN: a token the sampler masked out, or the
    model's distribution overflowing under an extreme repetition penalty. JSON has no -Infinity:
    the body could not be written (a 500, found by the HTTP fuzzer), and streams would carry
    tokens strict parsers reject."""
    return logprob if math.isfinite(logprob) else MIN_LOGPROB


def _usage(pb: common_pb2.Usage) -> Usage:
    return Usage(
        prompt_tokens=pb.prompt_tokens,
        completion_tokens=pb.completion_tokens,
        cached_tokens=pb.cached_tokens,
    )
