"""The gRPC backend: ``pdmesh.v1.RouterService.Generate``, streamed, with text or token ids.

Each streamed message says how many token ids it carries, so ITL is split exactly per token
(see ``timing``); the last message carries the finish reason and ``usage``.
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import json_format

from benchmarks.serve.backends import CONNECT_TIMEOUT_S, Backend, BackendError
from benchmarks.serve.config import ServeBenchConfig
from benchmarks.serve.constrained import DEFAULT_SCHEMA, is_constrained
from benchmarks.serve.datasets import BenchRequest
from benchmarks.serve.timing import RequestResult, StreamClock
from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

FAILED_REASONS = (common_pb2.FINISH_REASON_ERROR, common_pb2.FINISH_REASON_ABORT)

CHANNEL_OPTIONS = [
    # long token-id prompts can pass gRPC's 4 MiB default
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class GrpcBackend(Backend):
    def __init__(self, cfg: ServeBenchConfig) -> None:
        super().__init__(cfg)
        self.address = cfg.grpc_target
        self._sampling = self._base_sampling()  # fails on a bad --extra-request-body up front
        self.json_schema_fraction = cfg.json_schema_fraction
        self.json_schema = cfg.json_schema or DEFAULT_SCHEMA
        self._channel: grpc.aio.Channel | None = None
        self._stub: router_pb2_grpc.RouterServiceStub | None = None

    @property
    def target(self) -> str:
        return f"grpc://{self.address} (pdmesh.v1.RouterService/Generate)"

    async def start(self) -> None:
        channel = await self._connect("gRPC server", "; is the router up (--grpc-target)?")
        self._stub = router_pb2_grpc.RouterServiceStub(channel)

    async def _connect(self, who: str, hint: str = "") -> grpc.aio.Channel:
        """The channel to ``self.address`` once it is ready; ``BackendError`` ("no ``who``
        answered ...``hint``") when nothing answers within ``CONNECT_TIMEOUT_S``."""
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        try:
            await asyncio.wait_for(self._channel.channel_ready(), CONNECT_TIMEOUT_S)
        except asyncio.TimeoutError as e:
            await self.close()
            raise BackendError(
                f"no {who} answered at {self.address} within {CONNECT_TIMEOUT_S:g} s{hint}"
            ) from e
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _base_sampling(self) -> common_pb2.SamplingParams:
        sp = common_pb2.SamplingParams(temperature=self.temperature)
        if self.ignore_eos:
            sp.ignore_eos = True
        try:
            # --extra-request-body names SamplingParams fields in their JSON form here.
            json_format.ParseDict(self.extra, sp)
        except json_format.ParseError as e:
            raise ValueError(f"--extra-request-body does not fit SamplingParams: {e}") from e
        return sp

    def sampling(self, req: BenchRequest) -> common_pb2.SamplingParams:
        """The run's sampling params, with ``req``'s output length."""
        sp = common_pb2.SamplingParams()
        sp.CopyFrom(self._sampling)
        sp.max_new_tokens = req.output_len
        return sp

    def request(self, req: BenchRequest, request_id: str) -> router_pb2.RouterGenerateRequest:
        sp = self.sampling(req)
        if is_constrained(req.index, self.json_schema_fraction):
            sp.json_schema = self.json_schema
        prompt = req.full_prompt()
        if isinstance(prompt, list):
            return router_pb2.RouterGenerateRequest(
                request_id=request_id,
                token_ids=router_pb2.TokenIds(ids=prompt),
                sampling_params=sp,
            )
        return router_pb2.RouterGenerateRequest(
            request_id=request_id, text=prompt, sampling_params=sp
        )

    async def _stream(
        self, req: BenchRequest, request_id: str, clock: StreamClock, result: RequestResult
    ) -> RequestResult:
        if self._stub is None:
            raise RuntimeError("GrpcBackend.start() was not awaited")
        # The deadline also tells the router when to give up; wait_for in send() is the backstop.
        call = self._stub.Generate(self.request(req, request_id), timeout=self.timeout)
        texts: list[str] = []
        usage: common_pb2.Usage | None = None
        finish = common_pb2.FINISH_REASON_UNSPECIFIED
        try:
            async for msg in call:
                # A message with text but no ids (should not happen) still counts as output.
                clock.arrived(len(msg.token_ids) or (1 if msg.text else 0))
                texts.append(msg.text)
                if msg.HasField("usage"):
                    usage = msg.usage
                if msg.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
                    finish = msg.finish_reason
                    clock.stop()
                if msg.finish_reason in FAILED_REASONS:
                    reason = common_pb2.FinishReason.Name(msg.finish_reason)
                    return clock.fail(result, f"{reason}: {msg.error or 'no message'}")
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return clock.fail(result, f"timed out after {self.timeout:g} s (deadline)")
            return clock.fail(result, f"{e.code().name}: {e.details()}")
        if finish == common_pb2.FINISH_REASON_UNSPECIFIED:
            return clock.fail(result, "the stream ended without a finish_reason")
        result.text = "".join(texts)
        return finished(result, clock, finish, usage)


def finished(
    result: RequestResult,
    clock: StreamClock,
    finish: int,
    usage: common_pb2.Usage | None,
) -> RequestResult:
    """``result`` of a stream that ended with ``finish``: its reason as the OpenAI backends
    report it ("stop"/"length"), its token counts from ``usage`` when the server sent one."""
    result.finish_reason = (
        common_pb2.FinishReason.Name(finish).removeprefix("FINISH_REASON_").lower()
    )
    return clock.finish(
        result,
        usage.completion_tokens if usage is not None else None,
        usage.prompt_tokens if usage is not None else None,
    )
