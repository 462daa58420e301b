"""The gateway's side of the router's gRPC API: generation requests with a deadline, spread
round-robin over one or more routers, plus health and model-name look-ups and the worker-admin
calls (sent to every router). The set of routers is live: ``add``/``remove`` follow the Consul
catalog under ``--discovery consul``.

``start`` runs the choices of one HTTP request and returns their ``Inbox``. Each router is a
``RouterLink``: by default one shared ``Stream`` call per router carries all of this process's
requests to it (``--no-router-stream``: one ``Generate`` call per request, as older gateways
did; a router without ``Stream`` gets those automatically). A router that is UNAVAILABLE before
a request got anything is skipped for the next one. Closing the inbox early (the HTTP client
went away, another choice failed) cancels the requests at the router, which passes the cancel on
to the worker, which frees the pages.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.telemetry import trace_carrier
from pdmesh.v1 import router_pb2, router_pb2_grpc
from services.gateway import router_errors
from services.gateway.inbox import Inbox, Output
from services.gateway.router_link import RouterLink

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 2.0  # health checks and ListWorkers: an answer or a quick "no"
# AddWorker answers after the router's first health check of the new worker (--rpc-timeout,
# 10 s by default, per check call)
ADMIN_TIMEOUT_S = 30.0
# /tokenize and /detokenize: a tokenizer call (and a model-info look-up) at the router
UNARY_TIMEOUT_S = 30.0


class RouterClient:
    def __init__(
        self,
        addresses: Sequence[str],
        timeout: float,
        tls: TLSConfig = PLAINTEXT,
        stream: bool = True,
        migration_limit: int = 0,
    ) -> None:
        """``addresses``: the routers to start with; more (or all, when empty) via ``add``.
        ``timeout``: each request's deadline. ``tls``: how the channels to them are secured
        (``--tls-*``). ``stream``: share one Stream call per router (``--router-stream``).
        ``migration_limit``: how often a request a router broke off mid-stream may resume on
        another (``--migration-limit``)."""
        self.timeout = timeout
        self.tls = tls
        self.stream = stream
        self.migration_limit = migration_limit
        self._links: dict[str, RouterLink] = {}
        self._retiring: dict[asyncio.Task[None], RouterLink] = {}  # removed, draining
        self._turn = itertools.count()
        for address in addresses:
            self.add(address)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(self._links)

    def add(self, address: str) -> None:
        if address not in self._links:
            self._links[address] = RouterLink(address, self.tls, self.stream)
            log.info("added router %s", address)

    async def remove(self, address: str) -> None:
        """Stop sending new requests to ``address``; the open ones get the request timeout to
        end, then its stream and channel close (in the background: the catalog watch that
        calls this goes on)."""
        link = self._links.pop(address, None)
        if link is not None:
            log.info("removed router %s", address)
            task = asyncio.get_running_loop().create_task(link.close(grace=self.timeout))
            self._retiring[task] = link
            task.add_done_callback(self._retiring.pop)

    def start(self, requests: Sequence[router_pb2.RouterGenerateRequest]) -> Inbox:
        """Start every request (choice i = requests[i]); their outputs come to the inbox."""
        inbox = Inbox(list(requests))
        links = list(self._links.values())  # a snapshot: the set may change meanwhile
        if not links:
            for output in inbox.outputs:
                output.fail(router_errors.no_router())
            return inbox
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        trace = trace_carrier()  # the HTTP request's span, for the router's spans
        context = contextvars.copy_context()
        for output in inbox.outputs:
            output.deadline = deadline
            output.timer = loop.call_at(deadline, self._expire, output)
            self._run(output, links, next(self._turn), 0, trace, context)
        return inbox

    def _run(
        self,
        output: Output,
        links: list[RouterLink],
        first: int,
        attempt: int,
        trace: Mapping[str, str],
        context: contextvars.Context,
    ) -> None:
        """Start ``output`` on its ``attempt``-th router (counting round-robin from
        ``first``); one that is UNAVAILABLE before it sent anything passes it on, one that
        goes away mid-stream has it resumed on the next (``_resumes``)."""
        link = links[(first + attempt) % len(links)]
        last = attempt + 1 >= len(links)

        def on_error(error: grpc.aio.AioRpcError) -> None:
            unavailable = error.code() == grpc.StatusCode.UNAVAILABLE
            if not unavailable or last or output.final or not self._resumes(output, link):
                output.fail(error)
                return
            log.warning("router %s unavailable: %s", link.address, error.details())
            output.moved(error)
            self._run(output, links, first, attempt + 1, trace, context)

        output.on_error = on_error
        if link.closed:  # removed since the snapshot
            on_error(router_errors.unavailable(link.address, "removed"))
            return
        link.start(output, trace, context)

    def _resumes(self, output: Output, link: RouterLink) -> bool:
        """Whether ``output``, whose router went away, goes on at the next one: at once if it
        received nothing; else resumed from the tokens the client has (``Resume``), within
        the migration limit."""
        if not output.received:
            return True
        if output.resumes >= self.migration_limit:
            return False
        output.resumes += 1
        request = router_pb2.RouterGenerateRequest()
        request.CopyFrom(output.request)
        request.resume.output_token_ids[:] = output.token_ids
        output.request = request
        log.warning(
            "router %s went away after %d tokens of request %s: resuming it on the next "
            "router (%d of at most %d)",
            link.address,
            len(output.token_ids),
            request.request_id or "(no id)",
            output.resumes,
            self.migration_limit,
        )
        return True

    def _expire(self, output: Output) -> None:
        output.timer = None
        if not output.final:
            if output.cancel is not None:
                output.cancel()
            output.fail(router_errors.deadline(self.timeout))

    async def healthy(self) -> bool:
        """Whether any router answers its health check with SERVING."""
        for link in list(self._links.values()):
            stub = health_pb2_grpc.HealthStub(link.channel)
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=LOOKUP_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return True
        return False

    async def model_names(self) -> list[str]:
        """The distinct model names the routers' workers report (empty if none is known)."""
        names: list[str] = []
        for link in list(self._links.values()):
            stub = link.stub
            try:
                reply = await stub.ListWorkers(
                    router_pb2.ListWorkersRequest(), timeout=LOOKUP_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                continue
            for worker in reply.workers:
                if worker.model_name and worker.model_name not in names:
                    names.append(worker.model_name)
        return names

    async def tokenize(
        self, request: router_pb2.RouterTokenizeRequest
    ) -> router_pb2.RouterTokenizeResponse:
        """``/tokenize`` on the next router (round-robin; an UNAVAILABLE one passes it on)."""
        reply: router_pb2.RouterTokenizeResponse = await self._unary("Tokenize", request)
        return reply

    async def detokenize(
        self, request: router_pb2.RouterDetokenizeRequest
    ) -> router_pb2.RouterDetokenizeResponse:
        """``/detokenize`` on the next router, as ``tokenize``."""
        reply: router_pb2.RouterDetokenizeResponse = await self._unary("Detokenize", request)
        return reply

    async def _unary(self, method: str, request: Any) -> Any:
        """One unary call, deadline ``min(timeout, UNARY_TIMEOUT_S)``, on the routers in turn
        from the next one round-robin until one is not UNAVAILABLE."""
        links = list(self._links.values())
        if not links:
            raise router_errors.no_router()
        first = next(self._turn)
        timeout = min(self.timeout, UNARY_TIMEOUT_S)
        for attempt in range(len(links)):
            link = links[(first + attempt) % len(links)]
            try:
                return await getattr(link.stub, method)(request, timeout=timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.UNAVAILABLE or attempt + 1 == len(links):
                    raise
                log.warning("router %s unavailable: %s", link.address, e.details())
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def add_worker(self, address: str, role: router_pb2.WorkerRole) -> router_pb2.Worker:
        """Add the worker on every router; the first router's view of it."""
        request = router_pb2.AddWorkerRequest(address=address, role=role)
        replies = [await stub.AddWorker(request, timeout=ADMIN_TIMEOUT_S) for stub in self._admin()]
        return replies[0].worker

    async def remove_worker(self, address: str) -> bool:
        """Remove the worker from every router; whether any of them had it."""
        request = router_pb2.RemoveWorkerRequest(address=address)
        found = [
            (await stub.RemoveWorker(request, timeout=ADMIN_TIMEOUT_S)).found
            for stub in self._admin()
        ]
        return any(found)

    async def list_workers(self) -> list[router_pb2.Worker]:
        """Every router's workers, each id once (the first router's view of it)."""
        seen: dict[str, router_pb2.Worker] = {}
        for stub in self._admin():
            reply = await stub.ListWorkers(router_pb2.ListWorkersRequest(), timeout=ADMIN_TIMEOUT_S)
            for worker in reply.workers:
                seen.setdefault(worker.id, worker)
        return list(seen.values())

    def _admin(self) -> list[router_pb2_grpc.RouterServiceStub]:
        if not self._links:
            raise router_errors.no_router()
        return [link.stub for link in list(self._links.values())]

    async def close(self) -> None:
        """Close every channel now (uvicorn let open requests finish before)."""
        links = [*self._links.values(), *self._retiring.values()]
        self._links = {}
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for link in links:
            await link.close()
