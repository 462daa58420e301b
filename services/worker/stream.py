"""``StreamSession``: one ``WorkerService.Stream`` call — many requests of one router over one
long-lived stream, their outputs sent once per engine step.

The router writes ``generate`` and ``cancel`` messages; the session starts each aggregated
request straight into the engine with itself as the ``OutputSink``, so a step's outputs for all
of this stream's requests arrive in one ``deliver`` call and leave in one message. A request
with ``disagg`` (the decode half of a PD pair) first waits for its KV in ``DisaggDecoder``; it
runs as a task of its own that feeds the same pending set.

Outputs wait in ``_pending`` (one entry per request, merged while the router reads slower than
steps come) until the writer — the handler's own loop — sends them all. ``--stream-interval N``
holds a request's tokens back until N are unsent (or it finished), as SGLang's flag does.

Every way a request ends is one of: its last output, a status entry (it failed to start, the
engine refused or crashed, its ``timeout_secs`` passed), a ``cancel`` from the router, or the
stream ending (router gone, worker stopping): then every request still open is stopped, so no
page outlives its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import cast

import grpc
from opentelemetry.trace import Span

from pdmesh.engine import AsyncEngine, InvalidRequestError, RequestOutput
from pdmesh.engine.sampling_params import SamplingParams
from pdmesh.errors import DeadlineExceededError, EngineDeadError
from pdmesh.pd.sides import DecodeSide
from pdmesh.rpc.errors import status_for
from pdmesh.rpc.multiplex import MultiplexSession
from pdmesh.telemetry import Metrics, start_detached_span
from pdmesh.telemetry.spans import ATTRIBUTE_PREFIX, DECODE, FIRST_TOKEN
from pdmesh.v1 import common_pb2, worker_pb2
from services.worker import convert

log = logging.getLogger(__name__)

# requests on a stream are counted in the process's metrics as the Generate calls they replace,
# so requests per worker, their codes and durations read the same whichever way they came
GENERATE_METHOD = "/pdmesh.v1.WorkerService/Generate"
_CODES = {c.value[0]: c for c in grpc.StatusCode}


@dataclass(eq=False)
class _Open:
    """A request of this stream that has not ended yet."""

    request_id: str
    stop: Callable[[], object]  # stops it wherever it is (engine, or waiting for its KV)
    started: float = dataclasses.field(default_factory=time.perf_counter)
    span: Span | None = None  # its DECODE span, when traced
    timer: asyncio.TimerHandle | None = None
    num_tokens: int = 0  # sent so far (the span's output_tokens)


class StreamSession(MultiplexSession[worker_pb2.WorkerStreamResponse]):
    def __init__(
        self,
        engine: AsyncEngine,
        decode_side: DecodeSide | None,
        claim: Callable[[str], None],
        release: Callable[[str], None],
        stream_interval: int = 1,
        metrics: Metrics | None = None,
    ) -> None:
        """``claim``/``release``: the worker's table of live request ids (shared with its
        Generate calls, so an id is unique across both); ``stream_interval``: tokens a request
        accumulates before it is sent (its last output is always sent at once); ``metrics``:
        where each request is counted as the Generate call it stands for."""
        self._engine = engine
        self._metrics = metrics
        self._decode_side = decode_side
        self._claim = claim
        self._release = release
        self._interval = max(stream_interval, 1)
        self._open: dict[str, _Open] = {}
        self._pending: dict[str, worker_pb2.GenerateResponse] = {}  # ready to send
        self._held: dict[str, worker_pb2.GenerateResponse] = {}  # under the stream interval
        self._ready = asyncio.Event()
        self._draining = False
        self._reading = True

    # -- the router's messages --------------------------------------------------------------

    def requests_ended(self) -> None:
        self._reading = False
        self._ready.set()

    def cancel(self, message: worker_pb2.WorkerStreamRequest) -> None:
        self._cancel(message.cancel)

    def start(self, message: worker_pb2.WorkerStreamRequest) -> None:
        request = message.generate
        request_id = request.request_id
        if not request_id:
            self._refuse("", InvalidRequestError("request_id", "must not be empty"))
            return
        if self._draining:
            self._refuse(request_id, EngineDeadError("the worker is shutting down"))
            return
        if request_id in self._open:
            # the caller could no longer tell the two apart: the id's request ends here
            self._cancel(request_id)
            self._refuse(request_id, _in_use(request_id))
            return
        try:
            self._claim(request_id)
        except InvalidRequestError as e:
            self._refuse(request_id, e)
            return
        try:
            params = convert.request_params_from_pb(request)
        except InvalidRequestError as e:
            self._release(request_id)
            self._refuse(request_id, convert.wire_error(e))
            return
        prompt = list(request.token_ids)
        if request.HasField("disagg"):
            if self._decode_side is None:
                self._release(request_id)
                self._refuse(request_id, convert.not_a_decode_worker())
                return
            # cancelling the pump closes DisaggDecoder.generate, which frees what it holds
            task = asyncio.ensure_future(self._pump_disagg(request, params, prompt))
            state = _Open(request_id, task.cancel)
        else:
            try:
                self._engine.start_into(request_id, prompt, params, self)
            except InvalidRequestError as e:
                self._release(request_id)
                self._refuse(request_id, e)
                return
            state = _Open(request_id, lambda: self._engine.detach(request_id))
        state.span = start_detached_span(
            DECODE, message.trace_context, request_id=request_id, prompt_tokens=len(prompt)
        )
        if message.timeout_secs > 0:
            loop = asyncio.get_running_loop()
            state.timer = loop.call_later(message.timeout_secs, self._expire, request_id)
        self._open[request_id] = state
        if self._metrics is not None:
            self._metrics.in_flight.labels(GENERATE_METHOD).inc()

    def _cancel(self, request_id: str) -> None:
        state = self._end(request_id, "CANCELLED")
        if state is not None:
            state.stop()
        self._pending.pop(request_id, None)
        self._held.pop(request_id, None)

    def _expire(self, request_id: str) -> None:
        state = self._open.get(request_id)
        if state is not None:
            state.stop()
            self.fail(request_id, DeadlineExceededError(f"request {request_id!r} timed out"))

    # -- outputs (OutputSink) ---------------------------------------------------------------

    def deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            self._add(out)
        self._ready.set()

    def fail(self, request_id: str, error: BaseException) -> None:
        if request_id not in self._open:
            return
        if isinstance(error, InvalidRequestError):
            error = convert.wire_error(error)
        entry = _status_entry(request_id, error)
        self._end(request_id, _code_of(entry.status.code).name)
        self._held.pop(request_id, None)
        self._pending[request_id] = entry
        self._ready.set()

    def _add(self, out: RequestOutput) -> None:
        state = self._open.get(out.request_id)
        if state is None:
            return  # cancelled, timed out or failed meanwhile
        if out.new_token_ids:
            if state.num_tokens == 0 and state.span is not None:
                state.span.add_event(FIRST_TOKEN)
            state.num_tokens += len(out.new_token_ids)
        pb = convert.output_to_pb(out)
        pb.request_id = out.request_id
        unsent = self._held.pop(out.request_id, None)
        if unsent is not None:
            _merge(unsent, pb)
            pb = unsent
        if out.finished:
            self._end(out.request_id)
        elif self._interval > 1 and len(pb.token_ids) < self._interval:
            self._held[out.request_id] = pb
            return
        before = self._pending.get(out.request_id)
        if before is None:
            self._pending[out.request_id] = pb
        else:
            _merge(before, pb)

    def _end(self, request_id: str, code: str = "OK") -> _Open | None:
        """Forget a request that ended (``code``: how its Generate call would have ended)."""
        state = self._open.pop(request_id, None)
        if state is None:
            return None
        if self._metrics is not None:
            elapsed = time.perf_counter() - state.started
            self._metrics.observe(GENERATE_METHOD, code, elapsed, failed=code != "OK")
            self._metrics.in_flight.labels(GENERATE_METHOD).dec()
        if state.timer is not None:
            state.timer.cancel()
        if state.span is not None:
            state.span.set_attribute(ATTRIBUTE_PREFIX + "output_tokens", state.num_tokens)
            state.span.end()
        self._release(request_id)
        return state

    async def _pump_disagg(
        self,
        request: worker_pb2.GenerateRequest,
        params: SamplingParams,
        prompt: list[int],
    ) -> None:
        """A disaggregated request: wait for its KV, then stream like any other."""
        assert self._decode_side is not None
        request_id = request.request_id
        prefill = convert.remote_prefill_from_pb(request.disagg)
        outputs = cast(
            AsyncGenerator[RequestOutput, None],
            self._decode_side.decoder.generate(request_id, prompt, params, prefill),
        )
        try:
            async with contextlib.aclosing(outputs):
                async for out in outputs:
                    self._add(out)
                    self._ready.set()
        except Exception as e:  # not CancelledError: a cancelled request says nothing more
            self.fail(request_id, e)

    def _refuse(self, request_id: str, error: BaseException) -> None:
        entry = _status_entry(request_id, error)
        if self._metrics is not None:
            self._metrics.observe(GENERATE_METHOD, _code_of(entry.status.code).name, 0.0, True)
        self._pending[request_id] = entry
        self._ready.set()

    # -- the writer -------------------------------------------------------------------------

    async def batches(self) -> AsyncIterator[worker_pb2.WorkerStreamResponse]:
        """What to send, as it becomes ready; ends once the router half-closed the stream (or
        the worker drains) and nothing is open or pending any more."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            if self._pending:
                outputs, self._pending = list(self._pending.values()), {}
                yield worker_pb2.WorkerStreamResponse(outputs=outputs)
            if (not self._reading or self._draining) and not self._open and not self._held:
                return

    def drain(self) -> None:
        """The worker is stopping: refuse new requests (UNAVAILABLE, so the router sends them
        elsewhere), let the open ones finish, then end the stream."""
        self._draining = True
        self._ready.set()

    def close(self) -> None:
        """The stream ended: stop every request still open on it."""
        for request_id in list(self._open):
            state = self._end(request_id, "CANCELLED")
            if state is not None:
                log.info("request %r: its stream ended before it finished; aborting", request_id)
                state.stop()


def _code_of(value: int) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


def _in_use(request_id: str) -> InvalidRequestError:
    return InvalidRequestError("request_id", f"{request_id!r} is already in use")


def _merge(into: worker_pb2.GenerateResponse, later: worker_pb2.GenerateResponse) -> None:
    """``later``'s outputs appended to ``into`` (one entry per request per message)."""
    into.token_ids.extend(later.token_ids)
    into.logprobs.extend(later.logprobs)
    if later.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED:
        into.finish_reason = later.finish_reason
    if later.HasField("usage"):
        into.usage.CopyFrom(later.usage)
    if later.HasField("error"):
        into.error = later.error


def _status_entry(request_id: str, error: BaseException) -> worker_pb2.GenerateResponse:
    status = status_for(error)
    if status.code == grpc.StatusCode.INTERNAL:
        log.error("request %r failed", request_id, exc_info=error)
    pb = worker_pb2.GenerateResponse(request_id=request_id)
    pb.status.code = status.code.value[0]
    pb.status.message = status.details
    if status.detail is not None:
        pb.status.detail.CopyFrom(status.detail)
    return pb
