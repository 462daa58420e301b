"""One RouterService.Generate request: tokenize → pick a worker (or a prefill/decode pair) →
stream its tokens through the incremental detokenizer → text deltas.

Disaggregated when the router knows decode workers, a prefill worker is healthy, the prompt has
at least ``disagg_min_prompt_tokens`` tokens and at least one token is wanted
(``pdmesh.routing.pd_pair``): ``disagg.start`` sends the request to both halves. Otherwise the
request goes whole to an aggregated or decode worker, which prefills it itself (conditional
disaggregation: no prefill, no failure). Either start runs the one attempt loop
(``pdmesh.routing.attempts``) for retries, backoff and breakers; a stream that breaks after
tokens were sent migrates by the same loop's rule.

What the routing core decides on is a ``RouteRequest`` (``convert.route_request``); each
attempt's worker message is made from it at the edge (``convert.worker_request``). Streaming a
worker call to the client — detokenizing, stop strings, reasoning and tool-call shaping — is
``relay.py``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from pdmesh.errors import InvalidRequestError
from pdmesh.routing import (
    CircuitBreakers,
    LoadTracker,
    RequestView,
    RetryConfig,
    RoundRobin,
    RouteRequest,
    RoutingPolicy,
)
from pdmesh.routing.attempts import (
    AttemptFailed,
    Attempts,
    Failure,
    Stopped,
    left,
    within_migration_limit,
)
from pdmesh.routing.pd_pair import Pair, choose_pair, disaggregates
from pdmesh.telemetry import event, set_attributes, span
from pdmesh.telemetry.router_metrics import RouterMetrics
from pdmesh.telemetry.spans import FIRST_TOKEN, ROUTE, TOKENIZE
from pdmesh.tokenizer.stop_strings import MAX_STOP_CHARS
from pdmesh.v1 import common_pb2, router_pb2, worker_pb2
from services.router import convert, disagg
from services.router.ids_only import TokenIdsOnly, wants_ids_only
from services.router.output_parsing import OutputParsers, output_shaper
from services.router.relay import Emit, WorkerFailed, next_reply, relay, resume
from services.router.tokenizer_client import Detokenizer, TokenizerClient
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.worker_client import GenerationCall
from services.router.workers import GENERATING_ROLES, WorkerHandle, WorkerSet

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """What ``generate`` needs from the router; one per router process.

    NOTE: with an ``emit`` (what ``RouterService.Stream`` and ``Generate`` pass), each worker
    message is relayed in the worker stream reader's own pass over the step's message
    (``relay.Relay``, the call's listener). After a stop string, usage counts the completion
    tokens up to the stop; the worker's prefix-cache figure is not known at that point (it
    arrives with the worker's last message, which is never read), so ``cached_tokens`` is 0.
    """

    workers: WorkerSet
    policy: RoutingPolicy  # picks the worker that generates (aggregated or decode)
    tokenizer: TokenizerClient
    prefill_policy: RoutingPolicy = field(default_factory=RoundRobin)
    disagg_min_prompt_tokens: int = 0
    decode_policy: RoutingPolicy | None = None  # PD decode side; None: ``policy``
    retry: RetryConfig = field(default_factory=RetryConfig)
    breakers: CircuitBreakers = field(default_factory=CircuitBreakers)
    loads: LoadTracker = field(default_factory=LoadTracker)
    rng: random.Random = field(default_factory=random.Random)  # backoff jitter
    metrics: RouterMetrics = field(default_factory=RouterMetrics)
    parsers: OutputParsers = field(default_factory=OutputParsers)
    # the retry / backoff / breaker / migration loop both starts run (pdmesh.routing.attempts)
    attempts: Attempts = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.attempts = Attempts(
            self.retry,
            self.breakers,
            self.rng,
            on_retry=self.metrics.retries.inc,
            on_unreachable=self.workers.mark_unhealthy,
        )

    def forget_worker(self, worker: WorkerHandle) -> None:
        """``worker`` left the set: drop its tree entries, breaker and load."""
        for policy in {id(p): p for p in self._policies()}.values():
            policy.remove_worker(worker.id)
        self.breakers.remove(worker.id)
        self.loads.remove(worker.id)

    def _policies(self) -> list[RoutingPolicy]:
        return [self.policy, self.prefill_policy, self.decode_policy or self.policy]

    async def generate(
        self,
        request: router_pb2.RouterGenerateRequest,
        timeout: float,
        calls: OutgoingCalls,
        emit: Emit | None = None,
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """Stream the request's output. ``timeout``: seconds left for the whole generation;
        ``calls``: where every outgoing call is registered, so the caller can cancel them;
        ``emit``: given, every message goes to it instead of being yielded, most of them from
        the worker stream's reader (synchronously, in order; it must not raise), and the
        generator ends when the request does."""
        admitted = time.perf_counter()
        request_id = request.request_id or uuid.uuid4().hex
        params = request.sampling_params
        _check_stop_strings(params.stop)
        # before the worker requests copy the params: a tool choice may set their grammar
        shaper = output_shaper(request, self.parsers)
        with span(TOKENIZE, chat=request.WhichOneof("input") == "chat"):
            prompt = await self.tokenizer.prompt_ids(request, timeout)
            set_attributes(prompt_tokens=len(prompt))
        detok: Detokenizer | TokenIdsOnly
        if wants_ids_only(params):
            detok = TokenIdsOnly(params)  # no tokenizer call at all for a token-id prompt
        else:
            skip = params.skip_special_tokens if params.HasField("skip_special_tokens") else None
            detok = await self.tokenizer.open_detokenizer(prompt, params.stop, skip, timeout, calls)
        deadline = asyncio.get_running_loop().time() + timeout
        route = convert.route_request(request_id, prompt, params, deadline)
        # what the policies see, also after a migration: the client's prompt
        view = route.view
        # completion tokens passed on to the client, over all workers (and, for a request
        # another router began, over all routers)
        sent: list[int] = []
        if request.HasField("resume"):
            sent = list(request.resume.output_token_ids)
            route = route.resumed(sent)
            resume(detok, shaper, sent)
        prefill_done = None
        # router overhead: everything before the first worker call is issued
        calls.on_next_track(lambda: self.metrics.overhead.observe(time.perf_counter() - admitted))
        with span(ROUTE, policy=_policy_name(self.policy)):
            # a resumed request continues on one worker (its prompt's KV is mostly output,
            # which no prefill worker holds)
            started = None if sent else await self._start_disaggregated(route, params, calls, view)
            if started is not None:
                worker, call, reply = started.decode, started.call, started.first
                prefill_done = started.prefill_done
            else:
                worker, call, reply = await self._start_on_a_worker(route, params, calls, view)
                set_attributes(worker=worker.id)
        mode = "aggregated" if prefill_done is None else "disaggregated"
        self.metrics.requests.labels(mode).inc()
        log.debug("request %s: %d prompt tokens on %s", request_id, len(prompt), worker.label)
        event(FIRST_TOKEN)  # on the Generate span: the first token is on its way to the client
        self.loads.start(worker.id, len(prompt))
        failed: tuple[WorkerHandle, ...] = ()  # workers this request migrated away from
        try:
            while True:
                try:
                    stream = relay(detok, call, worker, reply, len(prompt), sent, shaper, emit)
                    async for out in stream:
                        yield out
                    self.breakers.record_success(worker.id)
                    calls.forget(call)  # its last message is in: let it end, never cancel it
                    return
                except WorkerFailed as e:
                    # nothing is retried once tokens were streamed, but a stream the worker
                    # broke may migrate (``Attempts.stream_broke``: any worker fault, whatever
                    # code a dead worker surfaced as; never a client error); the breaker learns
                    # of it either way (only the worker's own failures: a tokenizer's error
                    # says nothing about it)
                    unreachable = e.code == grpc.StatusCode.UNAVAILABLE
                    broke = Failure(worker, e.code, e.details, unreachable)
                    if not self.attempts.stream_broke(broke, deadline):
                        raise
                    failed = (*failed, worker)
                    self._check_migration(worker, e, len(failed), request_id)
                    self.metrics.migrations.labels(worker.id).inc()
                    moved = await self._migrate(route, params, sent, calls, view, failed)
                    self.loads.finish(worker.id, len(prompt))
                    worker, call, reply = moved
                    self.loads.start(worker.id, len(prompt))
        finally:
            self.loads.finish(worker.id, len(prompt))
            if prefill_done is not None:
                prefill_done.cancel()  # done by now (D's first token needed P's end) or moot

    def _check_migration(
        self, worker: WorkerHandle, error: UpstreamError, migration: int, request_id: str
    ) -> None:
        """Raise a clear UNAVAILABLE unless the request may make its ``migration``-th move
        (the failed worker's advertised ``--migration-limit`` bounds the moves per request)."""
        limit = worker.migration_limit
        if not within_migration_limit(migration, limit):
            raise WorkerFailed(
                grpc.StatusCode.UNAVAILABLE,
                f"{worker.label} failed mid-stream ({error.details}); migration limit "
                f"({limit}) reached, not migrating request {request_id}",
            )
        log.warning(
            "request %s: %s failed mid-stream (%s); migrating (%d of at most %d)",
            request_id,
            worker.label,
            error.details,
            migration,
            limit,
        )

    async def _migrate(
        self,
        request: RouteRequest,
        params: common_pb2.SamplingParams,
        sent: list[int],
        calls: OutgoingCalls,
        view: RequestView,
        failed: tuple[WorkerHandle, ...],
    ) -> tuple[WorkerHandle, GenerationCall, worker_pb2.GenerateResponse]:
        """Continue ``request`` on another generating worker (never one in ``failed``): the
        prompt plus the ``sent`` tokens as its prompt, the token budgets lowered by
        ``len(sent)`` (``RouteRequest.resumed``). The engine seeds its sampler per (seed,
        position), so a seeded or greedy request continues exactly where it broke off;
        ``resumed_output_tokens`` tells it which prompt tokens are output, which a constrained
        request's grammar replays (else the new worker would constrain the continuation from
        the grammar's start)."""
        moved = request.resumed(sent)
        try:
            return await self._start_on_a_worker(moved, params, calls, view, exclude=failed)
        except UpstreamError as e:
            names = ", ".join(w.label for w in failed)
            raise WorkerFailed(
                e.code, f"migrating the request off {names} failed: {e.details}", e.detail
            ) from e

    async def _start_disaggregated(
        self,
        request: RouteRequest,
        params: common_pb2.SamplingParams,
        calls: OutgoingCalls,
        view: RequestView,
    ) -> disagg.Started | None:
        """Start ``request`` on a prefill/decode pair; None when it should run whole on one
        worker. A side that fails before the decode's first token is charged to its own
        breaker (unreachable: also marked unhealthy) and, when the failure is retryable, the
        pair is picked again without it after a backoff (``Attempts.run``): both halves of the
        room were cancelled, so a new room (``disagg.start`` draws one per call) on a new pair
        is safe."""

        async def once(tried: tuple[WorkerHandle, ...]) -> disagg.Started | None:
            pair = self._pair_for(request, view, exclude=tried)
            if pair is None:
                return None
            prefill, decode = pair
            attempt = convert.worker_request(request, params, request.attempt_id())
            try:
                started = await disagg.start(
                    attempt, prefill, decode, left(request.deadline), calls
                )
            except disagg.SideFailed as e:
                unreachable = isinstance(e, disagg.Unreachable)
                raise AttemptFailed(Failure(e.worker, e.code, e.details, unreachable), e) from e
            self.breakers.record_success(prefill.id)  # D's first token needed P's KV
            set_attributes(prefill=prefill.id, decode=decode.id, bootstrap_room=started.room)
            return started

        outcome = await self.attempts.run(once, request.deadline)
        if not isinstance(outcome, Stopped):
            return outcome
        if outcome.refused and outcome.last is not None:
            raise outcome.last.error
        return None  # no pair (left): the request runs whole on one worker

    def _pair_for(
        self, request: RouteRequest, view: RequestView, exclude: tuple[WorkerHandle, ...] = ()
    ) -> Pair[WorkerHandle] | None:
        """The prefill/decode pair for ``request``, or None to run it whole on one worker
        (also when every prefill is unhealthy or has its circuit open: decode-only beats
        failing)."""
        has_decodes = self.workers.has_role("decode")
        if not disaggregates(request, self.disagg_min_prompt_tokens, has_decodes):
            return None
        prefills = [
            w
            for w in self.workers.healthy("prefill")
            if w not in exclude and self.breakers.is_available(w.id)
        ]
        return choose_pair(
            prefills,
            lambda: self._available(("decode",), exclude),
            lambda candidates: self._choose(self.prefill_policy, candidates, view),
            lambda candidates: self._choose(self.decode_policy or self.policy, candidates, view),
        )

    def _available(
        self, roles: tuple[str, ...], exclude: tuple[WorkerHandle, ...] = ()
    ) -> list[WorkerHandle]:
        """Candidates of ``roles`` whose circuit is not open (``Attempts.available``)."""
        return self.attempts.available(self.workers.candidates(exclude=exclude, roles=roles))

    def _choose(
        self, policy: RoutingPolicy, candidates: Sequence[WorkerHandle], view: RequestView
    ) -> WorkerHandle:
        """``_pick``, counted: the decision, and how much of the prompt the tree matched."""
        worker = _pick(policy, candidates, view, self.loads)
        matched = getattr(policy, "last_matched_tokens", None)  # prefix-tree policies
        self.metrics.routed(_policy_name(policy), worker.id, len(view.token_ids), matched)
        return worker

    async def _start_on_a_worker(
        self,
        request: RouteRequest,
        params: common_pb2.SamplingParams,
        calls: OutgoingCalls,
        view: RequestView,
        exclude: tuple[WorkerHandle, ...] = (),
    ) -> tuple[WorkerHandle, GenerationCall, worker_pb2.GenerateResponse]:
        """Open Generate on a worker the policy picks (never one in ``exclude``) and read its
        first message. A failure before anything was streamed is charged to the worker's
        breaker (unless the request is at fault) and, when retryable, retried after a backoff
        on another worker (``Attempts.run``): never the same one twice, so retries also end
        when every candidate has been tried."""

        async def once(
            tried: tuple[WorkerHandle, ...],
        ) -> tuple[WorkerHandle, GenerationCall, worker_pb2.GenerateResponse] | None:
            candidates = self._available(GENERATING_ROLES, exclude=(*exclude, *tried))
            if not candidates:
                return None
            worker = self._choose(self.policy, candidates, view)
            attempt = convert.worker_request(request, params, request.attempt_id())
            call: GenerationCall = calls.track(worker.generate(attempt, left(request.deadline)))
            try:
                return worker, call, await next_reply(call, worker, retryable=True)
            except grpc.aio.AioRpcError as e:
                error = UpstreamError.from_rpc(worker.label, e)
                unreachable = error.code == grpc.StatusCode.UNAVAILABLE
                why = e.details() or e.code().name
                raise AttemptFailed(Failure(worker, error.code, why, unreachable), error) from e

        outcome = await self.attempts.run(once, request.deadline)
        if not isinstance(outcome, Stopped):
            return outcome
        if outcome.last is None:
            if exclude:
                raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "no other worker is available")
            raise UpstreamError(grpc.StatusCode.UNAVAILABLE, "no workers are registered")
        error = outcome.last.error
        assert isinstance(error, UpstreamError)
        if error.code != grpc.StatusCode.UNAVAILABLE:
            raise error
        names = ", ".join(w.label for w in outcome.tried)
        raise UpstreamError(grpc.StatusCode.UNAVAILABLE, f"{names} unavailable: {error.details}")


def _pick(
    policy: RoutingPolicy,
    candidates: Sequence[WorkerHandle],
    view: RequestView,
    loads: LoadTracker,
) -> WorkerHandle:
    """``policy``'s choice among ``candidates``; policies key their state by worker id, so a
    worker removed and re-added under the same id keeps its place in the trees."""
    by_id = {w.id: w for w in candidates}
    ids = list(by_id)
    return by_id[policy.select(ids, view, loads.view(ids))]


def _policy_name(policy: RoutingPolicy) -> str:
    """``--policy``'s name for ``policy`` (span attributes use the name operators set)."""
    return policy.name or type(policy).__name__


def _check_stop_strings(stop: list[str]) -> None:
    # checked here too so a bad stop string fails before a worker starts generating
    for i, s in enumerate(stop):
        if not s:
            raise InvalidRequestError(f"sampling_params.stop[{i}]", "must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidRequestError(
                f"sampling_params.stop[{i}]", f"is longer than {MAX_STOP_CHARS} characters"
            )
