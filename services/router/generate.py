"""One RouterService.Generate request: tokenize → pick a worker (or a prefill/decode pair) →
stream its tokens through the incremental detokenizer → text deltas.

Disaggregated when the router knows decode workers, a prefill worker is healthy, the prompt has
at least ``disagg_min_prompt_tokens`` tokens and at least one token is wanted: ``disagg.start``
sends the request to both halves. Otherwise the request goes whole to an aggregated or decode
worker, which prefills it itself (conditional disaggregation: no prefill, no failure).

NOTE: every worker message is pushed to the tokenizer's DetokenizeStream and answered by
exactly one router message carrying the worker's token ids, their logprobs and the text the
detokenizer released for them. When the detokenizer reports a stop string, the tokens after the
one that completed it are dropped, the worker call is cancelled (the worker aborts the request
and frees its pages) and the last message says FINISH_REASON_STOP. Usage then counts the
completion tokens up to the stop; the worker's prefix-cache figure is not known at that point
(it arrives with the worker's last message, which is never read), so ``cached_tokens`` is 0.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeAlias

import grpc
import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.routing import POLICIES, RoundRobin, RoutingPolicy
from pdmesh.telemetry import event, set_attributes, span
from pdmesh.telemetry.spans import FIRST_TOKEN, ROUTE, TOKENIZE
from pdmesh.v1 import common_pb2, router_pb2, tokenizer_pb2, worker_pb2
from services.router import disagg
from services.router.tokenizer_client import Detokenizer, TokenizerClient
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.workers import WorkerHandle, WorkerSet

log = logging.getLogger(__name__)

WorkerCall: TypeAlias = (
    "grpc.aio.UnaryStreamCall[worker_pb2.GenerateRequest, worker_pb2.GenerateResponse]"
)
MAX_ATTEMPTS = 2  # a worker that cannot be reached before streaming anything: try one other


@dataclass
class Generation:
    """What ``generate`` needs from the router; one per router process."""

    workers: WorkerSet
    policy: RoutingPolicy  # picks the worker that generates (aggregated or decode)
    tokenizer: TokenizerClient
    prefill_policy: RoutingPolicy = field(default_factory=RoundRobin)
    disagg_min_prompt_tokens: int = 0

    async def generate(
        self, request: router_pb2.RouterGenerateRequest, timeout: float, calls: OutgoingCalls
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Stream the request's output. ``timeout``: seconds left for the whole generation;
        ``calls``: where every outgoing call is registered, so the caller can cancel them."""
        request_id = request.request_id or uuid.uuid4().hex
        params = request.sampling_params
        _check_stop_strings(params.stop)
        with span(TOKENIZE, chat=request.WhichOneof("input") == "chat"):
            prompt = await self.tokenizer.prompt_ids(request, timeout)
            set_attributes(prompt_tokens=len(prompt))
        skip = params.skip_special_tokens if params.HasField("skip_special_tokens") else None
        detok = await self.tokenizer.open_detokenizer(prompt, params.stop, skip, timeout, calls)
        worker_request = worker_pb2.GenerateRequest(
            request_id=request_id, token_ids=prompt, sampling_params=params
        )
        prefill_done = None
        with span(ROUTE, policy=_policy_name(self.policy)):
            started = await self._start_disaggregated(worker_request, timeout, calls)
            if started is not None:
                worker, call, reply = started.decode, started.call, started.first
                prefill_done = started.prefill_done
            else:
                worker, call, reply = await self._start_on_a_worker(worker_request, timeout, calls)
                set_attributes(worker=worker.id)
        log.debug("request %s: %d prompt tokens on %s", request_id, len(prompt), worker.label)
        event(FIRST_TOKEN)  # on the Generate span: the first token is on its way to the client
        try:
            async for out in self._stream(detok, call, worker, reply, len(prompt)):
                yield out
        finally:
            if prefill_done is not None:
                prefill_done.cancel()  # done by now (D's first token needed P's end) or moot

    async def _start_disaggregated(
        self, request: worker_pb2.GenerateRequest, timeout: float, calls: OutgoingCalls
    ) -> disagg.Started | None:
        """Start ``request`` on a prefill/decode pair; None when it should run whole on one
        worker. A worker found unreachable before the decode's first token (e.g. killed, not
        yet out of the catalog) is marked unhealthy and the pair picked again, once: its half
        of the room was cancelled, so a new room on another pair is safe."""
        tried: tuple[WorkerHandle, ...] = ()
        for attempt in range(MAX_ATTEMPTS):
            prefill = self._prefill_for(request, exclude=tried)
            if prefill is None:
                return None
            decodes = self.workers.candidates(exclude=tried, roles=("decode",))
            if not decodes:
                return None
            decode = self.policy.select(decodes)
            try:
                started = await disagg.start(request, prefill, decode, timeout, calls)
            except disagg.Unreachable as e:
                self.workers.mark_unhealthy(e.worker, e.details)
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                tried = (*tried, e.worker)
                continue
            set_attributes(prefill=prefill.id, decode=decode.id, bootstrap_room=started.room)
            return started
        return None

    def _prefill_for(
        self, request: worker_pb2.GenerateRequest, exclude: tuple[WorkerHandle, ...] = ()
    ) -> WorkerHandle | None:
        """The prefill worker for ``request``, or None to run it whole on one worker."""
        params = request.sampling_params
        if params.HasField("max_new_tokens") and params.max_new_tokens == 0:
            return None  # nothing to decode
        if len(request.token_ids) < self.disagg_min_prompt_tokens:
            return None
        if not self.workers.has_role("decode"):
            return None
        prefills = [w for w in self.workers.healthy("prefill") if w not in exclude]
        return self.prefill_policy.select(prefills) if prefills else None

    async def _stream(
        self,
        detok: Detokenizer,
        call: WorkerCall,
        worker: WorkerHandle,
        reply: worker_pb2.GenerateResponse,
        num_prompt_tokens: int,
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        num_sent = 0  # completion tokens already passed on
        while True:
            final = reply.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
            delta = await detok.push(reply.token_ids, final)
            if delta.stopped:
                call.cancel()
                yield _stopped(delta, reply, worker, num_sent, num_prompt_tokens)
                await detok.close()
                return
            yield _passed_on(delta, reply, worker)
            if final:
                # after the client has its last message: read both streams' ends, so their
                # client spans end with the request
                await detok.close()
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await call.read()
                return
            num_sent += len(reply.token_ids)
            reply = await _next(call, worker)

    async def _start_on_a_worker(
        self, request: worker_pb2.GenerateRequest, timeout: float, calls: OutgoingCalls
    ) -> tuple[WorkerHandle, WorkerCall, worker_pb2.GenerateResponse]:
        """Open Generate on a worker the policy picks and read its first message. A worker that
        is unavailable before it streamed anything is marked unhealthy and another one tried."""
        tried: tuple[WorkerHandle, ...] = ()
        error: grpc.aio.AioRpcError | None = None
        while len(tried) < MAX_ATTEMPTS:
            candidates = self.workers.candidates(exclude=tried)
            if not candidates:
                break
            worker = self.policy.select(candidates)
            call: WorkerCall = calls.track(worker.stub.Generate(request, timeout=timeout))
            try:
                return worker, call, await _next(call, worker, retryable=True)
            except grpc.aio.AioRpcError as e:
                self.workers.mark_unhealthy(worker, e.details() or e.code().name)
                tried, error = (*tried, worker), e
        if error is None:
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "no workers are registered")
        names = ", ".join(w.label for w in tried)
        raise UpstreamError(
            grpc.StatusCode.UNAVAILABLE, f"{names} unavailable: {error.details() or ''}"
        )


async def _next(
    call: WorkerCall, worker: WorkerHandle, retryable: bool = False
) -> worker_pb2.GenerateResponse:
    """The worker's next message. With ``retryable``, an UNAVAILABLE failure is raised as the
    raw grpc error (so the caller may try another worker); anything else as UpstreamError."""
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as e:
        if retryable and e.code() == grpc.StatusCode.UNAVAILABLE:
            raise
        raise UpstreamError.from_rpc(worker.label, e) from e
    if reply is grpc.aio.EOF:
        raise UpstreamError(
            grpc.StatusCode.INTERNAL, f"{worker.label} ended the stream without a finish reason"
        )
    return reply


def _policy_name(policy: RoutingPolicy) -> str:
    """``--policy``'s name for ``policy`` (span attributes use the name operators set)."""
    return next((n for n, cls in POLICIES.items() if type(policy) is cls), type(policy).__name__)


def _check_stop_strings(stop: list[str]) -> None:
    # checked here too so a bad stop string fails before a worker starts generating
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"sampling_params.stop[{i}]", "must not be empty")


def _passed_on(
    delta: tokenizer_pb2.DetokenizeStreamResponse,
    reply: worker_pb2.GenerateResponse,
    worker: WorkerHandle,
) -> router_pb2.RouterGenerateResponse:
    out = router_pb2.RouterGenerateResponse(
        text=delta.text,
        token_ids=reply.token_ids,
        logprobs=reply.logprobs,
        finish_reason=reply.finish_reason,
        worker_id=worker.id,
    )
    if reply.HasField("usage"):
        out.usage.CopyFrom(reply.usage)
    if reply.HasField("error"):
        out.error = reply.error
    return out


def _stopped(
    delta: tokenizer_pb2.DetokenizeStreamResponse,
    reply: worker_pb2.GenerateResponse,
    worker: WorkerHandle,
    num_sent: int,
    num_prompt_tokens: int,
) -> router_pb2.RouterGenerateResponse:
    keep = delta.num_tokens - num_sent  # tokens of this reply up to the stop string's last
    return router_pb2.RouterGenerateResponse(
        text=delta.text,
        token_ids=reply.token_ids[:keep],
        logprobs=reply.logprobs[:keep],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(prompt_tokens=num_prompt_tokens, completion_tokens=delta.num_tokens),
        worker_id=worker.id,
        matched_stop=delta.stop_string,
    )
