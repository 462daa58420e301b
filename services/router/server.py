"""The ``pdmesh.v1.RouterService`` servicer and the router's entry coroutine.

Handlers are thin: generation is ``generate.Generation``, the worker set ``workers.WorkerSet``,
admission (concurrency limit and queue) ``pdmesh.routing.admission``. Errors of the router's own
checks escape to ``pdmesh.rpc``'s interceptor; errors of the services it calls
(``UpstreamError``) are answered with the callee's own status.

NOTE on cancellation: when the client cancels (or its deadline passes), grpc may cancel the
handler while it is parked at a ``yield``, and then no ``finally`` in it runs until the garbage
collector closes the generator. So the upstream calls are also cancelled from the call's
done-callback, which grpc runs as soon as the call ends: the worker sees its Generate cancelled
and frees the request's pages at once. The request's admission slot is given back there too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import grpc.aio

from pdmesh.discovery import (
    PREFILL,
    ROUTER,
    TOKENIZER,
    WORKER,
    Discovery,
    Endpoint,
    diffing,
    make_discovery,
    registration_for,
)
from pdmesh.errors import InvalidRequestError
from pdmesh.routing import CircuitBreakers, make_policy
from pdmesh.routing.admission import Admission, QueueFullError, QueueTimeoutError, Ticket
from pdmesh.rpc.errors import status_for
from pdmesh.rpc.multiplex import Sessions
from pdmesh.rpc.server import RpcServer
from pdmesh.telemetry import Metrics
from pdmesh.telemetry.router_metrics import RouterMetrics, WorkerGauges
from pdmesh.v1 import router_pb2, router_pb2_grpc
from services.mesh import MeshOptions, Observed
from services.router import convert
from services.router.client_stream import ClientStream
from services.router.coalesce import Coalescer
from services.router.config import RouterServiceConfig
from services.router.generate import Emit, Generation
from services.router.output_parsing import OutputParsers
from services.router.tokenization import Tokenization
from services.router.tokenizer_client import TokenizerClient
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.workers import WorkerSet

log = logging.getLogger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(
        self,
        generation: Generation,
        request_timeout: float,
        admission: Admission,
        metrics: Metrics,
    ) -> None:
        """``metrics``: the process's generic families (TTFT and inter-token latency are
        timed here, as the router's clients see them); the router's own are
        ``generation.metrics``."""
        self._generation = generation
        self._workers = generation.workers
        self._request_timeout = request_timeout
        self._admission = admission
        self._metrics = metrics
        self._stats = generation.metrics
        self._sessions: Sessions[ClientStream] = Sessions()
        self._tokenization = Tokenization(generation.tokenizer, generation.workers)

    async def Generate(
        self, request: router_pb2.RouterGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        calls = OutgoingCalls()
        ticket = self._admission.ticket()
        # the generation runs as its own task and the handler sends what it left pending, all
        # of it merged: a client slower than the steps gets fewer, larger messages
        pending = Coalescer()
        failure: list[BaseException] = []
        finished = asyncio.Event()

        def emit(reply: router_pb2.RouterGenerateResponse) -> None:
            pending.put(0, reply)

        async def produce() -> None:
            try:
                replies = self.replies(request, context.time_remaining, calls, ticket, emit)
                async for reply in replies:
                    emit(reply)
            except Exception as e:
                failure.append(e)
            finally:
                finished.set()
                pending.wake()

        producer = asyncio.ensure_future(produce())
        # whether the handler ended the call itself (done, failed, refused); grpc.aio's
        # context.cancelled() does not say (it stays False for a client's cancel)
        answered = False

        def done(_: object) -> None:
            producer.cancel()
            calls.cancel_all()
            ticket.release()
            if not answered:  # the client cancelled, or let its deadline pass, first
                self._stats.cancellations.inc()

        context.add_done_callback(done)
        try:
            while not (finished.is_set() and not pending):
                await pending.wait()
                for reply in pending.take():
                    yield reply
            answered = True
            if failure:
                raise failure[0]
        except UpstreamError as e:
            calls.cancel_all()
            await e.abort(context)
        finally:
            producer.cancel()
            ticket.release()

    async def Stream(
        self,
        request_iterator: AsyncIterator[router_pb2.RouterStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[router_pb2.RouterStreamResponse]:
        async for batch in self._sessions.serve(ClientStream(self), request_iterator, context):
            yield batch

    def drain(self) -> None:
        """The router is stopping: its Stream calls refuse new requests (UNAVAILABLE, so the
        gateway sends them to another router) and end once their open ones finished."""
        self._sessions.drain()

    async def replies(
        self,
        request: router_pb2.RouterGenerateRequest,
        time_remaining: Callable[[], float | None],
        calls: OutgoingCalls,
        ticket: Ticket,
        emit: Emit | None = None,
    ) -> AsyncIterator[router_pb2.RouterGenerateResponse]:
        """One generation as both ``Generate`` and ``Stream`` run it: admission, the request
        timeout, metrics; errors are counted and raised. ``time_remaining``: seconds left of
        the client's own deadline (None: it set none), asked once admitted; ``emit``: where
        the replies go as they are made, instead of being yielded (``Generation.generate``)."""
        timer = self._metrics.token_timer()  # from arrival: the queue is part of the TTFT
        try:
            await ticket.acquire()
        except (QueueFullError, QueueTimeoutError) as e:
            self._stats.rejected.labels(e.error_code).inc()
            self._stats.errors.labels(status_for(e).code.name).inc()
            raise
        finally:
            if ticket.waited:
                self._stats.queue_wait.observe(ticket.waited)
        # the request timeout counts from admission; the client's own deadline from its send
        remaining = time_remaining()
        timeout = self._request_timeout if remaining is None else remaining
        timeout = min(self._request_timeout, timeout)
        counted: Emit | None = None
        if emit is not None:
            sink = emit

            def counted(reply: router_pb2.RouterGenerateResponse) -> None:
                timer.tokens(len(reply.token_ids))
                sink(reply)

        try:
            async for reply in self._generation.generate(request, timeout, calls, counted):
                timer.tokens(len(reply.token_ids))
                yield reply
        except UpstreamError as e:
            self._stats.errors.labels(e.code.name).inc()
            raise
        except Exception as e:
            self._stats.errors.labels(status_for(e).code.name).inc()
            raise

    def new_ticket(self) -> Ticket:
        return self._admission.ticket()

    def count_cancellation(self) -> None:
        self._stats.cancellations.inc()

    async def ListWorkers(
        self, request: router_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ListWorkersResponse:
        return router_pb2.ListWorkersResponse(
            workers=[convert.worker_to_pb(w) for w in self._workers.all()]
        )

    async def AddWorker(
        self, request: router_pb2.AddWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.AddWorkerResponse:
        worker = self._workers.add(
            request.address,
            convert.role_from_pb(request.role),
            request.id if request.HasField("id") else None,
        )
        await self._workers.check(worker)  # so the reply says whether it takes traffic yet
        return router_pb2.AddWorkerResponse(worker=convert.worker_to_pb(worker))

    async def RemoveWorker(
        self, request: router_pb2.RemoveWorkerRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RemoveWorkerResponse:
        kind = request.WhichOneof("worker")
        if kind is None:
            raise InvalidRequestError("worker", "set id or address")
        if kind == "id":
            found = self._workers.remove(id=request.id)
        else:
            found = self._workers.remove(address=request.address)
        return router_pb2.RemoveWorkerResponse(found=found)

    async def Tokenize(
        self, request: router_pb2.RouterTokenizeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterTokenizeResponse:
        try:
            return await self._tokenization.tokenize(request, self._time_left(context))
        except UpstreamError as e:
            await e.abort(context)

    async def Detokenize(
        self, request: router_pb2.RouterDetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouterDetokenizeResponse:
        try:
            return await self._tokenization.detokenize(request, self._time_left(context))
        except UpstreamError as e:
            await e.abort(context)

    def _time_left(self, context: grpc.aio.ServicerContext) -> float:
        """The client's deadline, capped by --request-timeout-secs (each upstream call is also
        capped by --rpc-timeout)."""
        remaining = context.time_remaining()
        return self._request_timeout if remaining is None else min(remaining, self._request_timeout)


async def serve(config: RouterServiceConfig, mesh: MeshOptions | None = None) -> None:
    """Route until SIGTERM/SIGINT; in-flight generations drain for the grace period. With
    ``--discovery consul`` the workers and tokenizers are the catalog's healthy instances,
    followed live, and the router registers itself."""
    mesh = mesh or MeshOptions()
    # --prometheus-port and --metrics-port name the same one /metrics server
    metrics_host, metrics_port = config.metrics_address(mesh.telemetry.metrics_port)
    telemetry = dataclasses.replace(mesh.telemetry, metrics_port=metrics_port)
    observed = Observed.start("pdmesh-router", metrics_host, telemetry)
    router_metrics = RouterMetrics(observed.metrics.registry)
    workers, tokenizer = _upstreams(config, mesh)
    generation = _generation(config, workers, tokenizer, router_metrics)
    admission = Admission(config.admission_config())
    router_metrics.watch_admission(lambda: admission.queued, lambda: admission.active)
    router_metrics.watch_workers(lambda: worker_gauges(generation))
    rpc = RpcServer(
        [SERVICE_NAME],
        interceptors=observed.interceptors(),
        max_receive_bytes=config.max_payload_size,
        tls=mesh.tls,
    )
    servicer = RouterServicer(generation, config.request_timeout_secs, admission, observed.metrics)
    router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, rpc.server)
    rpc.on_drain.append(servicer.drain)
    discovery = make_discovery(mesh.discovery)
    if mesh.discovery.discovery == "consul":
        follow_catalog(discovery, workers, tokenizer)
    workers.start_health_checks(config.health_check_interval)
    registration = registration_for(
        mesh.discovery, ROUTER, config.host, 0, meta=observed.meta(), grpc_tls=mesh.tls.serves_tls
    )
    try:
        await observed.serve(
            rpc, config.host, config.port, config.grace_period, discovery, registration
        )
    finally:
        await workers.close()
        await tokenizer.close()


def _upstreams(config: RouterServiceConfig, mesh: MeshOptions) -> tuple[WorkerSet, TokenizerClient]:
    """The worker set (the command line's workers in it) and the tokenizer client."""
    workers = WorkerSet(config.rpc_timeout, drain_timeout=config.request_timeout_secs, tls=mesh.tls)
    for role, addresses in config.workers_by_role.items():
        for address in addresses:
            workers.add(address, role)
    # under Consul the tokenizers are the catalog's; --tokenizer (which has a default) is for
    # static discovery
    consul = mesh.discovery.discovery == "consul"
    tokenizer = TokenizerClient(
        [] if consul else [config.tokenizer],
        config.rpc_timeout,
        tls=mesh.tls,
        drain_timeout=config.request_timeout_secs,  # a stream lasts as long as its generation
    )
    return workers, tokenizer


def _generation(
    config: RouterServiceConfig,
    workers: WorkerSet,
    tokenizer: TokenizerClient,
    metrics: RouterMetrics,
) -> Generation:
    """The router's core over those upstreams: policies, retries, breakers, parsers."""
    settings = config.policy_settings()
    generation = Generation(
        workers,
        make_policy(config.policy, settings),
        tokenizer,
        prefill_policy=make_policy(config.policy_for("prefill"), settings),
        disagg_min_prompt_tokens=config.disagg_min_prompt_tokens,
        # its own instance even when the names agree: a tree of decode placements must not
        # steer prefills (and round-robin cursors must not interleave)
        decode_policy=make_policy(config.policy_for("decode"), settings),
        retry=config.retry_config(),
        breakers=CircuitBreakers(config.breaker_config()),
        metrics=metrics,
        parsers=OutputParsers(config.tool_call_parser, config.reasoning_parser),
    )
    workers.on_remove.append(generation.forget_worker)
    return generation


def worker_gauges(generation: Generation) -> Iterator[WorkerGauges]:
    """Each worker's load, circuit and health, for a scrape (which runs on the metrics
    server's thread: it only reads, from a copy of the worker list)."""
    for worker in generation.workers.all():
        yield WorkerGauges(
            worker=worker.id,
            role=worker.role,
            in_flight=generation.loads.get(worker.id).in_flight,
            circuit_state=generation.breakers.get(worker.id).state.value,
            healthy=worker.healthy,
        )


def follow_catalog(discovery: Discovery, workers: WorkerSet, tokenizer: TokenizerClient) -> None:
    """Keep ``workers`` and ``tokenizer`` in step with the catalog: an instance that registers
    (or turns healthy) is added and checked at once; one that deregisters or fails Consul's
    health check is removed (its in-flight calls run on)."""

    def add_worker(endpoint: Endpoint) -> None:
        worker = workers.add(endpoint.target, endpoint.role or "aggregated", endpoint.id)
        workers.check_soon(worker)

    def remove_worker(endpoint: Endpoint) -> None:
        workers.remove(id=endpoint.id)

    # one diffing per watch: each remembers what its own watch delivered
    for service in (WORKER, PREFILL):
        discovery.watch(service, None, diffing(add_worker, remove_worker))
    discovery.watch(
        TOKENIZER,
        None,
        diffing(lambda e: tokenizer.add(e.target), lambda e: tokenizer.remove(e.target)),
    )
