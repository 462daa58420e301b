"""Proto ↔ ``pdmesh.engine`` values, for the worker service's edge only.

Sampling fields honour proto3 explicit presence: an unset field takes ``SamplingParams``'s
default (temperature 1.0, ...), never proto3's zero; an unset max_new_tokens is None, the
engine's --default-max-tokens (the rest of the context by default). Validation stays in the
engine (``SamplingParams.validate``), which names the offending field.
"""

from __future__ import annotations

from typing import Any

from pdmesh.engine import (
    EngineLoad,
    FinishReason,
    InvalidRequestError,
    RequestOutput,
    SamplingParams,
)
from pdmesh.engine.async_engine import EngineInfo
from pdmesh.pd.values import RemotePrefill
from pdmesh.v1 import common_pb2, worker_pb2
from services.worker.pd_convert import logprob_to_pb

# optional scalar fields copied as they are when set; `stop` and `skip_special_tokens` are the
# tokenizer's business (the router applies them), so the worker ignores them
_SCALAR_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "seed",
    "max_new_tokens",
    "min_new_tokens",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "json_schema",
    "regex",
    "ebnf",
)

_FINISH_REASONS = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: common_pb2.FINISH_REASON_ABORT,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}

# the engine names prompt problems by its own argument names; callers know the wire's
_WIRE_FIELDS = {"prompt": "token_ids", "prompt_token_ids": "token_ids"}


def sampling_params_from_pb(
    pb: common_pb2.SamplingParams, resumed_output_tokens: int = 0
) -> SamplingParams:
    kwargs: dict[str, Any] = {
        name: getattr(pb, name) for name in _SCALAR_FIELDS if pb.HasField(name)
    }
    kwargs.setdefault("max_new_tokens", None)
    kwargs["stop_token_ids"] = tuple(pb.stop_token_ids)
    # sorted: the same bias map gives the same (hashable, comparable) params
    kwargs["logit_bias"] = tuple(sorted(pb.logit_bias.items()))
    kwargs["resumed_output_tokens"] = resumed_output_tokens
    return SamplingParams(**kwargs)


def request_params_from_pb(request: worker_pb2.GenerateRequest) -> SamplingParams:
    """The engine's params of a ``GenerateRequest``: its sampling params, and how many of its
    prompt tokens a migrated request already output (the engine keeps both in one value)."""
    return sampling_params_from_pb(request.sampling_params, request.resumed_output_tokens)


def wire_error(e: InvalidRequestError) -> InvalidRequestError:
    """``e`` with its field named as in ``GenerateRequest`` (e.g. "prompt" → "token_ids")."""
    return InvalidRequestError(_WIRE_FIELDS.get(e.field, e.field), e.message)


def output_to_pb(out: RequestOutput) -> worker_pb2.GenerateResponse:
    pb = worker_pb2.GenerateResponse(
        token_ids=out.new_token_ids,
        logprobs=[logprob_to_pb(lp) for lp in out.new_logprobs],
        finish_reason=_FINISH_REASONS[out.finish_reason],
    )
    if out.finished:
        pb.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=out.num_prompt_tokens,
                completion_tokens=out.num_completion_tokens,
                cached_tokens=out.num_cached_tokens,
            )
        )
    if out.error is not None and out.finish_reason is FinishReason.ERROR:
        pb.error = out.error
    return pb


def not_a_decode_worker() -> InvalidRequestError:
    """What a request with ``disagg`` gets from a worker in --mode aggregated."""
    return InvalidRequestError(
        "disagg",
        "this worker runs --mode aggregated; disaggregated requests need a worker in --mode decode",
    )


def remote_prefill_from_pb(pb: worker_pb2.DisaggParams) -> RemotePrefill:
    if not pb.bootstrap_address:
        raise InvalidRequestError(
            "disagg.bootstrap_address", "a decode worker needs the prefill's bootstrap address"
        )
    return RemotePrefill(pb.bootstrap_address, pb.bootstrap_room, pb.prefill_worker_id)


def load_to_pb(load: EngineLoad) -> worker_pb2.GetLoadResponse:
    return worker_pb2.GetLoadResponse(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_free_pages=load.num_free_pages,
        num_total_pages=load.num_total_pages,
        page_size=load.page_size,
        prefix_hit_rate=load.prefix_hit_rate,
        prefix_hit_tokens=load.prefix_hit_tokens,
        num_preemptions=load.num_preemptions,
        num_awaiting_kv=load.num_awaiting_kv,
        num_held=load.num_held,
    )


def model_info_to_pb(
    engine: EngineInfo, role: str = "aggregated", bootstrap_port: int = 0, migration_limit: int = 0
) -> worker_pb2.GetModelInfoResponse:
    """What the worker serves; read once at startup (none of it changes while serving)."""
    layout = engine.kv_layout()
    return worker_pb2.GetModelInfoResponse(
        model_name=engine.source.name,
        vocab_size=engine.vocab_size,
        max_model_len=engine.max_model_len,
        eos_token_ids=sorted(engine.eos_token_ids),
        page_size=layout.page_size,
        dtype=layout.dtype,
        device=layout.device,
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        role=role,
        bootstrap_port=bootstrap_port,
        migration_limit=migration_limit,
    )
