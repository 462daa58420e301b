"""One request's worker call relayed to its client: every worker message goes through the
request's in-process detokenizer and is answered by exactly one router message carrying the
worker's token ids, their logprobs and the text the detokenizer released for them.

``relay`` streams one worker call (``Generation.generate`` calls it again on the new worker when
the request migrates); ``Relay`` is the work of one output, also run as the call's listener by
the shared worker stream's reader, so the request's task wakes for its first output and its end,
not once per token. When the detokenizer reports a stop string, the tokens after the one that
completed it are dropped, the worker call is cancelled (the worker aborts the request and frees
its pages) and the last message says FINISH_REASON_STOP.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import cast

import grpc
import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.telemetry import tracing_installed
from pdmesh.tokenizer import StreamDelta
from pdmesh.v1 import common_pb2, router_pb2, worker_pb2
from services.router.ids_only import TokenIdsOnly
from services.router.output_parsing import OutputShaper
from services.router.tokenizer_client import Detokenizer
from services.router.upstream import UpstreamError
from services.router.worker_client import GenerationCall
from services.router.worker_stream import StreamCall
from services.router.workers import WorkerHandle

_UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED

# where a request's outgoing messages go, in order, as they are made (``Generation.generate``)
Emit = Callable[[router_pb2.RouterGenerateResponse], None]


async def relay(
    detok: Detokenizer | TokenIdsOnly,
    call: GenerationCall,
    worker: WorkerHandle,
    reply: worker_pb2.GenerateResponse,
    num_prompt_tokens: int,
    sent: list[int],
    shaper: OutputShaper | None = None,
    emit: Emit | None = None,
) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
    """Pass ``call``'s tokens on; ``sent``: the completion tokens already passed on (by
    earlier workers, when the request migrated), extended with each message's;
    ``shaper``: the request's reasoning / tool-call parsing, which rewrites each message;
    ``emit``: see ``Generation.generate`` (on a shared worker stream the reader then relays every
    output after the first; errors still come through the call's ``read``)."""
    relay = Relay(detok, call, worker, num_prompt_tokens, sent, shaper, emit)
    try:
        while True:
            out = relay.handle(reply, reply.finish_reason != _UNFINISHED)
            if emit is None:
                yield out
            else:
                emit(out)
            if relay.done:
                break
            if emit is not None and not relay.listening and isinstance(call, StreamCall):
                relay.listening = call.listen(relay.step)  # queued outputs go to it now
                if relay.done:
                    break
            try:
                reply = await next_reply(call, worker)
            except WorkerFailed:
                # the relay's stop cancelled the call, or its last output ended it
                if not relay.done:
                    raise
            if relay.error is not None:
                raise relay.error
            if relay.done:
                break
            # an output nobody relayed (no listener: a Generate call): handled here
    finally:
        if relay.listening:
            cast(StreamCall, call).listen(None)
    detok.close()
    if relay.finished and tracing_installed():
        # after the client has its last message. Traced: read both streams' ends, so
        # their client spans end with the request. Untraced, the worker call's status
        # comes in by itself: reading its end would cost every request one more round
        # through grpc's completion queue before the client's stream can end (about
        # 0.3 ms and 13% of the router's CPU per request, python -m benchmarks
        # router-overhead)
        with contextlib.suppress(grpc.aio.AioRpcError):
            await call.read()


class WorkerFailed(UpstreamError):
    """The generating worker's stream failed (as opposed to, e.g., the detokenizer's)."""


class Relay:
    """One request's outputs on one worker call, each turned into the message for the client:
    through the detokenizer (stop strings: the call is cancelled, the tokens after the stop
    dropped), ``passed_on`` / ``stopped`` and the shaper. ``handle`` is the work of one
    output; ``step`` is the call's listener, run by the worker stream's reader, which hands the
    message to ``emit`` without waking the request's task (a failure is kept in ``error`` and
    the output declined, so the task wakes and raises it)."""

    __slots__ = (
        "_detok",
        "_call",
        "_worker",
        "_num_prompt_tokens",
        "_sent",
        "_num_before",
        "_shaper",
        "_emit",
        "done",
        "finished",
        "listening",
        "error",
    )

    def __init__(
        self,
        detok: Detokenizer | TokenIdsOnly,
        call: GenerationCall,
        worker: WorkerHandle,
        num_prompt_tokens: int,
        sent: list[int],
        shaper: OutputShaper | None,
        emit: Emit | None,
    ) -> None:
        self._detok = detok
        self._call = call
        self._worker = worker
        self._num_prompt_tokens = num_prompt_tokens
        self._sent = sent
        self._num_before = len(sent)  # completion tokens earlier workers produced
        self._shaper = shaper
        self._emit = emit
        self.done = False  # the request's last message was made (finished or stopped)
        self.finished = False  # ... for the worker's last output (not a stop string)
        self.listening = False
        self.error: Exception | None = None

    def handle(
        self, reply: worker_pb2.GenerateResponse, final: bool
    ) -> router_pb2.RouterGenerateResponse:
        delta = self._detok.push(reply.token_ids, final)
        shaper = self._shaper
        if delta.stopped:
            self._call.cancel()
            self.done = True
            out = stopped(delta, reply, self._worker, len(self._sent), self._num_prompt_tokens)
            if shaper is not None:
                shaper.shape(out, final=True)
            return out
        out = passed_on(
            delta, reply, self._worker, self._num_prompt_tokens, self._num_before, final
        )
        if shaper is not None:
            shaper.shape(out, final)
        if final:
            self.done = self.finished = True
        else:
            self._sent.extend(reply.token_ids)
        return out

    def step(self, reply: worker_pb2.GenerateResponse, final: bool) -> bool:
        """The listener: True when ``reply`` was handled and emitted."""
        if self.done or self.error is not None:
            return False
        try:
            out = self.handle(reply, final)
            self._emit(out)  # type: ignore[misc]  # (listening only with an emit)
        except Exception as e:  # raised in the request's task, which its read() wakes
            self.error = e
            return False
        return True


async def next_reply(
    call: GenerationCall, worker: WorkerHandle, retryable: bool = False
) -> worker_pb2.GenerateResponse:
    """The worker's next message. With ``retryable``, a failure is raised as the raw grpc
    error (the caller decides whether to try another worker); otherwise as UpstreamError."""
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as e:
        if retryable:
            raise
        failed = UpstreamError.from_rpc(worker.label, e)
        raise WorkerFailed(failed.code, failed.details, failed.detail) from e
    if reply is grpc.aio.EOF:
        raise WorkerFailed(
            grpc.StatusCode.INTERNAL, f"{worker.label} ended the stream without a finish reason"
        )
    return reply


def resume(
    detok: Detokenizer | TokenIdsOnly, shaper: OutputShaper | None, sent: Sequence[int]
) -> None:
    """Bring a request another router began up to where the client is: its detokenizer (text
    held back for a stop string or a partial character included) and parsers take the
    ``sent`` tokens as they took them there; what they release was sent already."""
    if isinstance(detok, Detokenizer) and (bad := detok.unknown(sent)):
        raise InvalidRequestError(
            "resume.output_token_ids",
            f"ids {bad[:5]} are outside the vocabulary [0, {detok.vocab_size})",
        )
    delta = detok.push(sent, False)
    if shaper is not None:
        shaper.shape(router_pb2.RouterGenerateResponse(text=delta.text), final=False)


def passed_on(
    delta: StreamDelta,
    reply: worker_pb2.GenerateResponse,
    worker: WorkerHandle,
    num_prompt_tokens: int,
    num_before: int = 0,
    final: bool = True,
) -> router_pb2.RouterGenerateResponse:
    """``reply`` for the client; ``num_before``: completion tokens of the workers the request
    migrated from, which the worker counted as prompt: usage is corrected to the client's
    view (its own prompt, every completion token); ``final``: whether it is the worker's last
    (only that one has usage or an error)."""
    out = router_pb2.RouterGenerateResponse(
        text=delta.text, token_ids=reply.token_ids, worker_id=worker.id
    )
    if reply.logprobs:
        out.logprobs.extend(reply.logprobs)
    if not final:
        return out
    out.finish_reason = reply.finish_reason
    if reply.HasField("usage"):
        out.usage.CopyFrom(reply.usage)
        if num_before:
            out.usage.prompt_tokens = num_prompt_tokens
            out.usage.completion_tokens = reply.usage.completion_tokens + num_before
            out.usage.cached_tokens = min(reply.usage.cached_tokens, num_prompt_tokens)
    if reply.HasField("error"):
        out.error = reply.error
    return out


def stopped(
    delta: StreamDelta,
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
