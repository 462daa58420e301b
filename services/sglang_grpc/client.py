"""Workers of kind ``sglang-grpc`` for pdmesh's router: ``SglangClient`` is the router's worker
client interface (``services/router/worker_client.py``: ``generate`` — a streaming call with
``read``/``cancel``/``async for`` — ``model_info``, ``close``, ``health_service``) made over
SGLang's scheduler protocol, so routing policies, retries, breakers, migration and PD pairing
work unchanged. It only has to fit that interface (a Protocol): nothing here imports the router.

Such a worker is named ``sglang-grpc://host:port`` wherever the router takes a worker address
(``--workers``, ``--prefill-workers``, ``--decode-workers``, AddWorker): an SGLang engine started
with ``--grpc-mode``, or a pdmesh worker (which serves the protocol too).

PD: the router's room is 63-bit, SGLang's wire field is int32, so the room is sent masked to 31
bits (the same on both halves). A prefill's request carries its own bootstrap host and port (an
SGLang prefill needs them; the port is its ``disaggregation_bootstrap_port`` from GetServerInfo);
a decode's carries the prefill's. Both halves must be the same implementation (pdmesh or SGLang):
the KV moves between them by their own transfer protocol.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, ClassVar, Protocol

import grpc
import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.sglang import sglang_scheduler_pb2 as sgl
from pdmesh.sglang import sglang_scheduler_pb2_grpc
from pdmesh.v1 import common_pb2, worker_pb2
from services.sglang_grpc import server_args as sa

KIND = "sglang-grpc"
SCHEME = f"{KIND}://"
SERVICE_NAME = sgl.DESCRIPTOR.services_by_name["SglangScheduler"].full_name
ROOM_MASK = (1 << 31) - 1  # non-negative int32
SGLANG_MAX_NEW_TOKENS = 128  # SGLang's default; pdmesh's engine has the same

_FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
}


def split_address(address: str) -> tuple[str, str]:
    """``("sglang-grpc", "host:port")`` for ``sglang-grpc://host:port``, ``("pdmesh", address)``
    for a plain ``host:port``."""
    if address.startswith(SCHEME):
        return KIND, address[len(SCHEME) :]
    if "://" in address:
        raise InvalidRequestError(
            "address", f"{address!r}: the only scheme is {SCHEME} (plain host:port is pdmesh's)"
        )
    return "pdmesh", address


class WorkerView(Protocol):
    """What the client reads off the router's handle of its worker (set once it is checked)."""

    @property
    def role(self) -> str: ...

    @property
    def bootstrap_address(self) -> str: ...


class SglangClient:
    """One SGLang-protocol worker: every request as its own Generate call (the protocol has no
    shared stream); model info from GetModelInfo and GetServerInfo."""

    kind = KIND
    health_service = SERVICE_NAME
    # an SGLang server's own ping policy is not ours to loosen, so its channel is not pinged
    channel_options: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def __init__(self, channel: grpc.aio.Channel, worker: WorkerView) -> None:
        self._stub = sglang_scheduler_pb2_grpc.SglangSchedulerStub(channel)
        self._worker = worker

    @classmethod
    def connect(cls, channel: grpc.aio.Channel, worker: WorkerView) -> SglangClient:
        return cls(channel, worker)

    def generate(self, request: worker_pb2.GenerateRequest, timeout: float) -> SglangCall:
        call = self._stub.Generate(generate_request_to_pb(request, self._worker), timeout=timeout)
        return SglangCall(call)

    def own_call(self, request: worker_pb2.GenerateRequest, timeout: float) -> SglangCall:
        return self.generate(request, timeout)  # every call is its own

    async def model_info(self, timeout: float) -> worker_pb2.GetModelInfoResponse:
        model, server = await asyncio.gather(
            self._stub.GetModelInfo(sgl.GetModelInfoRequest(), timeout=timeout),
            self._stub.GetServerInfo(sgl.GetServerInfoRequest(), timeout=timeout),
        )
        return model_info_from_pb(model, server)

    async def close(self) -> None:
        return None  # nothing of its own runs: its calls end with the channel


class SglangCall:
    """One SGLang Generate call, read as a ``pdmesh.v1`` Generate stream (``ReplyReader``). gRPC
    errors pass through unchanged: the router maps their codes as for pdmesh workers."""

    def __init__(self, call: Any) -> None:
        self._call = call  # grpc.aio.UnaryStreamCall[sgl.GenerateRequest, sgl.GenerateResponse]
        self._reader = ReplyReader()

    async def read(self) -> worker_pb2.GenerateResponse | Any:
        """The next message, or ``grpc.aio.EOF`` once the stream ended."""
        if self._reader.finished:
            return grpc.aio.EOF
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            return grpc.aio.EOF
        return self._reader.convert(reply)

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def __aiter__(self) -> AsyncIterator[worker_pb2.GenerateResponse]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[worker_pb2.GenerateResponse]:
        while (reply := await self.read()) is not grpc.aio.EOF:
            yield reply


class ReplyReader:
    """SGLang replies → ``pdmesh.v1`` replies: each carries the new tokens (and their logprobs);
    the one made of ``complete`` also the finish reason and usage."""

    def __init__(self) -> None:
        self.num_sent = 0  # output tokens passed on so far
        self.finished = False

    def convert(self, reply: sgl.GenerateResponse) -> worker_pb2.GenerateResponse:
        kind = reply.WhichOneof("response")
        if kind == "chunk":
            return self._from_chunk(reply.chunk)
        if kind == "complete":
            self.finished = True
            return self._from_complete(reply.complete)
        return worker_pb2.GenerateResponse()  # an empty frame: nothing new

    def _from_chunk(self, chunk: sgl.GenerateStreamChunk) -> worker_pb2.GenerateResponse:
        new = list(chunk.token_ids)  # chunk token ids are new ones
        self.num_sent += len(new)
        return worker_pb2.GenerateResponse(
            token_ids=new, logprobs=_tail_logprobs(chunk.output_logprobs, len(new))
        )

    def _from_complete(self, complete: sgl.GenerateComplete) -> worker_pb2.GenerateResponse:
        # engines differ on whether `output_ids` repeats the streamed tokens: the count says
        # how many are new, and they are the last ones
        output = list(complete.output_ids)
        total = complete.completion_tokens or max(len(output), self.num_sent)
        num_new = min(max(total - self.num_sent, 0), len(output))
        new = output[len(output) - num_new :]
        self.num_sent += num_new
        reply = worker_pb2.GenerateResponse(
            token_ids=new,
            logprobs=_tail_logprobs(complete.output_logprobs, num_new),
            usage=common_pb2.Usage(
                prompt_tokens=complete.prompt_tokens,
                completion_tokens=complete.completion_tokens or self.num_sent,
                cached_tokens=complete.cached_tokens,
            ),
        )
        reason = _FINISH_REASONS.get(complete.finish_reason)
        if reason is None:
            reply.finish_reason = common_pb2.FINISH_REASON_ERROR
            reply.error = f"unknown finish reason {complete.finish_reason!r} from the worker"
        else:
            reply.finish_reason = reason
        return reply


def _tail_logprobs(pb: sgl.OutputLogProbs, count: int) -> list[common_pb2.TokenLogprob]:
    """The logprobs of the last ``count`` tokens (engines send them as totals or as deltas)."""
    if count == 0 or len(pb.token_logprobs) < count:
        return []
    start = len(pb.token_logprobs) - count
    tops = list(pb.top_logprobs)
    out = []
    for i in range(start, len(pb.token_logprobs)):
        top = tops[i] if i < len(tops) else sgl.TopLogProbs()
        out.append(
            common_pb2.TokenLogprob(
                token_id=pb.token_ids[i] if i < len(pb.token_ids) else 0,
                logprob=pb.token_logprobs[i],
                top=[
                    common_pb2.TopLogprob(token_id=t, logprob=v)
                    for t, v in zip(top.token_ids, top.values)
                ],
            )
        )
    return out


def generate_request_to_pb(
    request: worker_pb2.GenerateRequest, worker: WorkerView
) -> sgl.GenerateRequest:
    """The router's request as SGLang's, every sampling field set explicitly (SGLang reads
    proto3 zeros as values: see protos/pdmesh/sglang/sglang_scheduler.proto)."""
    p = request.sampling_params
    params = sgl.SamplingParams(
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        top_k=p.top_k if p.HasField("top_k") and p.top_k > 0 else -1,
        min_p=p.min_p,
        frequency_penalty=p.frequency_penalty,
        presence_penalty=p.presence_penalty,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else 1.0,
        max_new_tokens=p.max_new_tokens if p.HasField("max_new_tokens") else SGLANG_MAX_NEW_TOKENS,
        stop=list(p.stop),
        stop_token_ids=list(p.stop_token_ids),
        skip_special_tokens=p.skip_special_tokens if p.HasField("skip_special_tokens") else True,
        spaces_between_special_tokens=True,
        n=1,
        min_new_tokens=p.min_new_tokens,
        ignore_eos=p.ignore_eos,
    )
    if p.HasField("json_schema"):
        params.json_schema = p.json_schema
    elif p.HasField("regex"):
        params.regex = p.regex
    elif p.HasField("ebnf"):
        params.ebnf_grammar = p.ebnf
    for token, bias in p.logit_bias.items():
        params.logit_bias[str(token)] = bias
    if request.resumed_output_tokens and params.WhichOneof("constraint") is not None:
        # SGLang cannot replay output through a grammar: its matcher would take the output
        # for prompt and constrain the continuation from the grammar's start
        raise InvalidRequestError(
            "resumed_output_tokens",
            "SGLang's protocol cannot resume a constrained request: a constrained request "
            "cannot migrate to an sglang-grpc:// worker",
        )
    # `seed` has no field in SGLang's protocol: a seeded request samples unseeded there
    out = sgl.GenerateRequest(
        request_id=request.request_id,
        tokenized=sgl.TokenizedInput(input_ids=list(request.token_ids)),
        sampling_params=params,
        return_logprob=p.logprobs,
        top_logprobs_num=p.top_logprobs,
        logprob_start_len=-1,  # no prompt logprobs
        stream=True,
    )
    if request.HasField("disagg"):
        # a decode is told its prefill's bootstrap server; a prefill its own
        address = request.disagg.bootstrap_address or worker.bootstrap_address
        host, _, port = address.rpartition(":")
        out.disaggregated_params.CopyFrom(
            sgl.DisaggregatedParams(
                bootstrap_host=host.strip("[]"),
                bootstrap_port=int(port) if port.isdigit() else 0,
                bootstrap_room=request.disagg.bootstrap_room & ROOM_MASK,
            )
        )
    return out


def model_info_from_pb(
    model: sgl.GetModelInfoResponse, server: sgl.GetServerInfoResponse
) -> worker_pb2.GetModelInfoResponse:
    args = server.server_args.fields
    mode = args[sa.DISAGGREGATION_MODE].string_value if sa.DISAGGREGATION_MODE in args else ""
    role = sa.ROLES.get(mode or "null", "aggregated")
    info = worker_pb2.GetModelInfoResponse(
        model_name=model.served_model_name or model.model_path,
        vocab_size=model.vocab_size,
        max_model_len=model.max_context_length,
        eos_token_ids=list(model.eos_token_ids),
        page_size=int(args[sa.PAGE_SIZE].number_value) if sa.PAGE_SIZE in args else 0,
        role=role,
    )
    if role == "prefill" and sa.BOOTSTRAP_PORT in args:
        info.bootstrap_port = int(args[sa.BOOTSTRAP_PORT].number_value)
    if sa.MIGRATION_LIMIT in args:  # pdmesh workers advertise it; SGLang engines do not
        info.migration_limit = int(args[sa.MIGRATION_LIMIT].number_value)
    return info
