"""SGLang's scheduler protocol ↔ pdmesh's worker protocol, for the SGLang servicer on pdmesh
workers (``servicer.py``): an SGLang ``GenerateRequest`` becomes a ``pdmesh.v1`` one, and the
worker's replies become SGLang chunks and one ``complete``.

NOTE on proto3 zeros: SGLang's ``SamplingParams`` has no presence on its core fields, so a 0 is
either a value or "unset". SGLang's own servicer passes them on as values (its gateway always
sets every field); here a 0 that no client can mean — ``top_p`` (must be > 0),
``repetition_penalty`` (must be > 0), ``n`` — takes SGLang's semantic default (1), ``top_k`` 0
means off (as -1 does), ``temperature`` 0 means greedy (SGLang's meaning too), and an unset
``max_new_tokens`` is SGLang's default of 128.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.errors import InvalidRequestError
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.v1 import common_pb2, worker_pb2

SGLANG_MAX_NEW_TOKENS = 128  # SGLang's default when max_new_tokens is unset
ROOM_MASK = (1 << 32) - 1  # SGLang rooms are int32 on this wire; pdmesh's are uint64
INT32_MAX = (1 << 31) - 1  # pdmesh's token ids and counts are int32, SGLang's uint32

# the worker names request fields by pdmesh's wire; an SGLang client knows its own
_SGLANG_FIELDS = {
    "token_ids": "tokenized.input_ids",
    "sampling_params.ebnf": "sampling_params.ebnf_grammar",
    "disagg": "disaggregated_params",
    "disagg.bootstrap_address": "disaggregated_params.bootstrap_host",
}

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def generate_request_from_pb(req: sgl.GenerateRequest) -> worker_pb2.GenerateRequest:
    """The pdmesh request for ``req``; raises ``InvalidRequestError`` (SGLang's field names) for
    what pdmesh workers cannot do rather than silently doing something else."""
    if not req.HasField("tokenized") or not req.tokenized.input_ids:
        raise InvalidRequestError(
            "tokenized.input_ids", "required: the gateway tokenizes, workers take token ids"
        )
    _refuse_unsupported(req)
    _check_int32(req)
    out = worker_pb2.GenerateRequest(
        request_id=req.request_id,
        token_ids=list(req.tokenized.input_ids),
        sampling_params=sampling_params_from_pb(req),
    )
    if req.HasField("disaggregated_params"):
        d = req.disaggregated_params
        out.disagg.bootstrap_room = d.bootstrap_room & ROOM_MASK  # same mapping on P and D
        # the decode side fetches from host:port; the prefill side ignores the address
        if d.bootstrap_host and d.bootstrap_port:
            out.disagg.bootstrap_address = _host_port(d.bootstrap_host, d.bootstrap_port)
    return out


def sampling_params_from_pb(req: sgl.GenerateRequest) -> common_pb2.SamplingParams:
    p = req.sampling_params
    out = common_pb2.SamplingParams(
        temperature=p.temperature,
        top_p=p.top_p or 1.0,
        top_k=p.top_k,  # 0 and -1 both disable top-k in pdmesh, as -1 does in SGLang
        min_p=p.min_p,
        repetition_penalty=p.repetition_penalty or 1.0,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        max_new_tokens=(
            p.max_new_tokens if p.HasField("max_new_tokens") else SGLANG_MAX_NEW_TOKENS
        ),
        min_new_tokens=p.min_new_tokens,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
    )
    # SGLang's oneof and pdmesh's three fields have the same names but for ebnf_grammar
    constraint = p.WhichOneof("constraint")
    if constraint is not None:
        name = "ebnf" if constraint == "ebnf_grammar" else constraint
        setattr(out, name, getattr(p, constraint))
    for token, bias in _logit_bias(p).items():
        out.logit_bias[token] = bias
    # `stop` strings and skip_special_tokens are the gateway's detokenizer's business
    if req.return_logprob:
        out.logprobs = True
        out.top_logprobs = req.top_logprobs_num
    return out


def sglang_error(e: InvalidRequestError) -> InvalidRequestError:
    """``e`` with its field named as in SGLang's ``GenerateRequest``."""
    return InvalidRequestError(_SGLANG_FIELDS.get(e.field, e.field), e.message)


def _refuse_unsupported(req: sgl.GenerateRequest) -> None:
    p = req.sampling_params
    if p.n > 1:
        raise InvalidRequestError("sampling_params.n", "pdmesh workers generate one sample (n=1)")
    if p.WhichOneof("constraint") == "structural_tag":
        raise InvalidRequestError(
            "sampling_params.structural_tag",
            "is not supported; use json_schema, regex or ebnf_grammar",
        )
    if req.HasField("mm_inputs") and req.mm_inputs.ByteSize():
        raise InvalidRequestError("mm_inputs", "multimodal inputs are not supported")
    if req.input_embeds:
        raise InvalidRequestError("input_embeds", "is not supported; send tokenized.input_ids")
    if req.lora_id:
        raise InvalidRequestError("lora_id", "LoRA adapters are not supported")
    if req.return_hidden_states:
        raise InvalidRequestError("return_hidden_states", "is not supported")


def _logit_bias(p: sgl.SamplingParams) -> dict[int, float]:
    """SGLang's logit_bias keys are token ids as strings (OpenAI's JSON shape); the engine
    checks the ids against the vocabulary and the biases' range."""
    out = {}
    for key, bias in p.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            token = -1
        if not 0 <= token <= INT32_MAX:
            raise InvalidRequestError(
                "sampling_params.logit_bias", f"key {key[:20]!r} is not a token id"
            )
        out[token] = bias
    return out


def _check_int32(req: sgl.GenerateRequest) -> None:
    """SGLang's token ids and counts are uint32, pdmesh's int32: a value past 2^31 - 1 is
    refused here, naming the field (building the pdmesh message would fail with a ValueError,
    an INTERNAL; found by the gRPC fuzzer)."""
    p = req.sampling_params
    lists = {"tokenized.input_ids": req.tokenized.input_ids}
    lists["sampling_params.stop_token_ids"] = p.stop_token_ids
    for name, values in lists.items():
        bad = [v for v in values if v > INT32_MAX]
        if bad:
            raise InvalidRequestError(name, f"ids {bad[:5]} are past pdmesh's {INT32_MAX}")
    counts = {"sampling_params.min_new_tokens": p.min_new_tokens}
    if p.HasField("max_new_tokens"):
        counts["sampling_params.max_new_tokens"] = p.max_new_tokens
    for name, value in counts.items():
        if value > INT32_MAX:
            raise InvalidRequestError(name, f"{value} is past pdmesh's {INT32_MAX}")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass
class ReplyStream:
    """Turns one request's pdmesh replies into SGLang responses. ``stream``: a chunk per reply
    with tokens, then the ``complete``; otherwise the ``complete`` alone. Chunk token ids are
    new ones, counts and logprobs are totals so far (the shape SGLang's engines send)."""

    request_id: str
    num_prompt_tokens: int
    stream: bool
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)

    def push(self, reply: worker_pb2.GenerateResponse) -> list[sgl.GenerateResponse]:
        self.output_ids.extend(reply.token_ids)
        self.logprobs.extend(reply.logprobs)
        out = []
        if self.stream and reply.token_ids:
            out.append(self._chunk(reply))
        if reply.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
            out.append(self._complete(reply))
        return out

    def _chunk(self, reply: worker_pb2.GenerateResponse) -> sgl.GenerateResponse:
        chunk = sgl.GenerateStreamChunk(
            token_ids=reply.token_ids,
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=len(self.output_ids),
        )
        if self.logprobs:
            chunk.output_logprobs.CopyFrom(output_logprobs_to_pb(self.logprobs))
        return sgl.GenerateResponse(request_id=self.request_id, chunk=chunk)

    def _complete(self, reply: worker_pb2.GenerateResponse) -> sgl.GenerateResponse:
        if reply.finish_reason == common_pb2.FINISH_REASON_ERROR:
            # SGLang reports failures as gRPC statuses, not in-band
            raise WorkerError(reply.error or "the request failed in the worker")
        complete = sgl.GenerateComplete(
            output_ids=self.output_ids,
            finish_reason=FINISH_REASONS.get(reply.finish_reason, "stop"),
            prompt_tokens=reply.usage.prompt_tokens or self.num_prompt_tokens,
            completion_tokens=reply.usage.completion_tokens or len(self.output_ids),
            cached_tokens=reply.usage.cached_tokens,
        )
        if reply.finish_reason == common_pb2.FINISH_REASON_STOP and self.output_ids:
            # pdmesh workers stop on token ids only (EOS or stop_token_ids): the last one
            complete.matched_token_id = self.output_ids[-1]
        if self.logprobs:
            complete.output_logprobs.CopyFrom(output_logprobs_to_pb(self.logprobs))
        return sgl.GenerateResponse(request_id=self.request_id, complete=complete)


class WorkerError(RuntimeError):
    """The worker ended the request with FINISH_REASON_ERROR (becomes INTERNAL)."""


def output_logprobs_to_pb(logprobs: list[common_pb2.TokenLogprob]) -> sgl.OutputLogProbs:
    return sgl.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in logprobs],
        token_ids=[lp.token_id for lp in logprobs],
        top_logprobs=[
            sgl.TopLogProbs(
                values=[t.logprob for t in lp.top], token_ids=[t.token_id for t in lp.top]
            )
            for lp in logprobs
            if lp.top
        ],
    )
