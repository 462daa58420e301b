"""The ``consul`` backend: register with the local agent, watch the catalog with blocking queries.

Registration carries Consul's native gRPC health check (the agent calls ``grpc.health.v1``
``Check`` on the instance every interval; RpcServer answers NOT_SERVING while draining) or an
HTTP check for the gateway, with ``DeregisterCriticalServiceAfter`` so a dead instance leaves
the catalog on its own. A keeper task re-registers when the agent forgot the instance (an agent
restarted without its data dir, or a reap after a long stall).

A watch long-polls ``/v1/health/service/<name>?passing`` with ``index``/``wait``. While the
agent is unreachable it keeps delivering nothing new — the last known set stays in force —
logs once, retries with jittered backoff, and resyncs when the agent answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Mapping
from typing import Any

from pdmesh.discovery.base import Watch
from pdmesh.discovery.consul_api import ConsulAPI, ConsulError, ConsulUnavailable
from pdmesh.discovery.model import (
    SERVICE_PREFIX,
    Endpoint,
    OnChange,
    ServiceRegistration,
)

log = logging.getLogger(__name__)

WATCH_WAIT_S = 30.0  # how long one blocking query parks; any change returns it at once
MIN_QUERY_GAP_S = 0.05  # a floor between queries, so a churning index cannot spin the loop


class ConsulDiscovery:
    def __init__(
        self,
        address: str,
        token: str = "",
        *,
        check_interval: float = 2.0,
        deregister_after: float = 90.0,
        request_timeout: float = 5.0,
        watch_wait: float = WATCH_WAIT_S,
        retry_min: float = 0.5,
        retry_max: float = 5.0,
        resync_interval: float = 10.0,
    ) -> None:
        """``address``: the agent's HTTP API (``[http[s]://]host[:port]``); ``retry_min`` /
        ``retry_max``: backoff bounds while the agent is unreachable; ``resync_interval``: how
        often a registration is checked to be still known to the agent."""
        self.api = ConsulAPI(address, token, request_timeout)
        self.check_interval = check_interval
        self.deregister_after = deregister_after
        self.watch_wait = watch_wait
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.resync_interval = resync_interval
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._watches: list[Watch] = []

    # -- registration ------------------------------------------------------------------------

    async def register(self, registration: ServiceRegistration) -> None:
        """Register now and keep it registered. An agent that is not up yet is not fatal (the
        keeper registers once it answers); a refusal (bad request, ACL denied) raises."""
        service_id = registration.service_id
        try:
            await self._put_registration(registration)
            log.info(
                "registered %s (%s) at %s in Consul %s",
                registration.name,
                service_id,
                registration.target,
                self.api.base_url,
            )
        except ConsulError as e:
            message = f"Consul {self.api.base_url} refused to register {service_id}: {e}"
            raise ConsulError(e.status, message) from e
        except ConsulUnavailable as e:
            log.warning(
                "cannot register %s in Consul yet (%s); retrying in the background", service_id, e
            )
        await self._stop_keeper(service_id)
        self._keepers[service_id] = asyncio.get_running_loop().create_task(
            self._keep(registration), name=f"consul keeper {service_id}"
        )

    async def deregister(self, registration: ServiceRegistration) -> None:
        """Stop keeping it and remove it from the agent at once; errors are logged (Consul
        reaps it after ``deregister_after`` anyway)."""
        service_id = registration.service_id
        await self._stop_keeper(service_id)
        try:
            await self.api.put(f"/v1/agent/service/deregister/{service_id}")
            log.info("deregistered %s from Consul", service_id)
        except ConsulError as e:
            if e.status != 404:  # already gone is what we wanted
                log.warning("deregistering %s from Consul failed: %s", service_id, e)
        except ConsulUnavailable as e:
            log.warning(
                "cannot deregister %s: Consul unreachable (%s); it expires after %.0fs",
                service_id,
                e,
                self.deregister_after,
            )

    async def _put_registration(self, registration: ServiceRegistration) -> None:
        await self.api.put(
            "/v1/agent/service/register",
            service_definition(registration, self.check_interval, self.deregister_after),
            # re-registering replaces the checks too, so changed check settings take effect
            params={"replace-existing-checks": "true"},
        )

    async def _keep(self, registration: ServiceRegistration) -> None:
        service_id = registration.service_id
        failures = 0
        while True:
            delay = self.resync_interval
            try:
                if not await self._is_registered(service_id):
                    await self._put_registration(registration)
                    log.info("(re-)registered %s in Consul", service_id)
                if failures:
                    log.info("Consul reachable again; %s is registered", service_id)
                failures = 0
            except (ConsulUnavailable, ConsulError) as e:
                if not failures:
                    log.warning("keeping %s registered failed: %s; retrying", service_id, e)
                failures += 1
                delay = self._backoff(failures)
            await asyncio.sleep(delay)

    async def _is_registered(self, service_id: str) -> bool:
        try:
            await self.api.get(f"/v1/agent/service/{service_id}")
        except ConsulError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def _stop_keeper(self, service_id: str) -> None:
        task = self._keepers.pop(service_id, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- watching ----------------------------------------------------------------------------

    def watch(self, service: str, tag: str | None, on_change: OnChange) -> Watch:
        watch = Watch(service, tag, on_change)
        self._watches.append(watch)
        return watch.start(self._watch_loop(watch))

    async def _watch_loop(self, watch: Watch) -> None:
        params = {"passing": "1"}
        if watch.tag is not None:
            params["tag"] = watch.tag
        path = f"/v1/health/service/{watch.service}"
        loop = asyncio.get_running_loop()
        index = 0
        failures = 0
        # the node id of the agent answering (a new one: it restarted, empty); None: not asked
        agent: str | None = None
        settle_until = 0.0  # see _settled
        while True:
            query = dict(params)
            wait = self.watch_wait
            if loop.time() < settle_until:  # come back when the window closes
                wait = max(min(wait, settle_until - loop.time()), 1.0)
            if index > 0:
                query |= {"index": str(index), "wait": f"{wait:g}s"}
            try:
                # the agent may hold the query up to wait + wait/16 (its jitter): allow that
                timeout = wait * 17 / 16 + self.api.timeout if index > 0 else None
                entries, new_index = await self.api.get(path, query, timeout=timeout)
                endpoints = frozenset(endpoint_from_entry(e) for e in entries or ())
            except (ConsulUnavailable, ConsulError, KeyError, TypeError, ValueError) as e:
                if not failures:
                    log.warning(
                        "watching %s: Consul failed (%s); keeping the last %d "
                        "endpoints and retrying",
                        watch.label,
                        e,
                        len(watch.endpoints),
                    )
                failures += 1
                index = 0  # after an outage, start with a plain query: the agent may be new
                await asyncio.sleep(self._backoff(failures))
                continue
            recovered = failures > 0
            if recovered:
                log.info("watching %s: Consul reachable again", watch.label)
                failures = 0
            # an index that goes backwards (a restarted agent, a snapshot restore) means ours
            # is meaningless there: the next query must not block on it
            index = new_index if new_index >= index else 0
            # instances gone from the set: were they dropped, or did the agent restart and
            # forget them? (it may restart between two queries without one failing)
            gone = {e.id for e in watch.endpoints} - {e.id for e in endpoints}
            if agent is None or (gone and loop.time() >= settle_until):
                now = await self._node_id()
                # a node id we cannot read (an ACL token without agent:read): after an
                # outage, assume the worst
                restarted = now != agent if agent and now else recovered and bool(gone)
                if restarted:
                    log.info(
                        "watching %s: the Consul agent restarted (node %s, was %s); keeping "
                        "instances it lost for up to %.0fs while they register again",
                        watch.label,
                        now or "unknown",
                        agent,
                        self.settle_s,
                    )
                    settle_until = loop.time() + self.settle_s
                agent = now or agent or ""
            if loop.time() < settle_until:
                endpoints = self._settled(watch, endpoints)
            await watch.deliver(endpoints)
            await asyncio.sleep(MIN_QUERY_GAP_S)

    async def _node_id(self) -> str:
        """The answering agent's node id ("" when it cannot be had). An agent restarted
        without its data dir (a dev agent always is) comes back with a new one, and without
        any of the services that were registered with it."""
        try:
            info, _ = await self.api.get("/v1/agent/self")
            return str(info["Config"]["NodeID"])
        except (ConsulUnavailable, ConsulError, KeyError, TypeError, ValueError):
            return ""

    @property
    def settle_s(self) -> float:
        """How long instances may take to be passing again in an agent that lost them (one
        restarted without its data, as a dev agent always is): each one's keeper notices
        within its resync interval (or its backoff, if it saw the outage), registers again, and
        the first check must pass."""
        return self.resync_interval + self.retry_max + 2 * self.check_interval

    def _settled(self, watch: Watch, endpoints: frozenset[Endpoint]) -> frozenset[Endpoint]:
        """``endpoints`` plus those delivered before that a restarted agent does not list
        (yet): dropping them would leave watchers with none while every instance is alive
        (their health is for the watchers to judge)."""
        ids = {e.id for e in endpoints}
        return endpoints | frozenset(e for e in watch.endpoints if e.id not in ids)

    def _backoff(self, failures: int) -> float:
        delay = min(self.retry_max, self.retry_min * 2 ** (failures - 1))
        return delay * random.uniform(0.8, 1.2)  # jitter: many services must not retry in step

    # -- catalog (for Prometheus service discovery) ------------------------------------------

    async def catalog(self, prefix: str = SERVICE_PREFIX) -> dict[str, list[Endpoint]]:
        """Every registered instance (healthy or not) of each service named ``prefix…``."""
        names, _ = await self.api.get("/v1/catalog/services")
        found: dict[str, list[Endpoint]] = {}
        for name in sorted(names or {}):
            if not name.startswith(prefix):
                continue
            nodes, _ = await self.api.get(f"/v1/catalog/service/{name}")
            found[name] = [endpoint_from_catalog(n) for n in nodes or ()]
        return found

    async def close(self) -> None:
        for watch in self._watches:
            await watch.stop()
        self._watches.clear()
        for service_id in list(self._keepers):
            await self._stop_keeper(service_id)
        await self.api.close()


def service_definition(
    registration: ServiceRegistration, check_interval: float, deregister_after: float
) -> dict[str, Any]:
    """The body of ``PUT /v1/agent/service/register`` for ``registration``."""
    body: dict[str, Any] = {
        "ID": registration.service_id,
        "Name": registration.name,
        "Address": registration.address,
        "Port": registration.port,
        "Tags": list(registration.tags),
        "Meta": dict(registration.meta),
    }
    check: dict[str, Any] = {
        "Name": f"{registration.name} {registration.check} health",
        "Interval": duration(check_interval),
        # a check slower than its interval would overlap the next one
        "Timeout": duration(min(check_interval, 5.0)),
        "DeregisterCriticalServiceAfter": duration(deregister_after),
    }
    if registration.check == "grpc":
        check |= {"GRPC": registration.target, "GRPCUseTLS": registration.grpc_tls}
        if registration.grpc_tls:
            # The agent cannot check our certificate's name (Consul 1.8 checks name the node,
            # not the address) and knows no mesh CA unless configured: it skips verification.
            # The check reads only SERVING/NOT_SERVING; clients of the mesh verify servers.
            # Under mutual TLS the agent must present a client certificate of the mesh CA
            # (cert_file/key_file with enable_agent_tls_for_checks), or the check fails and
            # the instance is never passing.
            check["TLSSkipVerify"] = True
    elif registration.check == "http":
        path = "/" + registration.http_check_path.lstrip("/")
        check |= {"HTTP": f"http://{registration.target}{path}", "Method": "GET"}
    if registration.check != "none":
        body["Check"] = check
    return body


def duration(seconds: float) -> str:
    """Seconds as a Go duration string ("2s", "1500ms")."""
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"


def endpoint_from_entry(entry: Mapping[str, Any]) -> Endpoint:
    """One item of ``/v1/health/service/<name>``."""
    service = entry["Service"]
    address = service.get("Address") or entry["Node"]["Address"]
    return Endpoint(
        id=service["ID"],
        address=address,
        port=int(service["Port"]),
        tags=tuple(service.get("Tags") or ()),
        meta=dict(service.get("Meta") or {}),
    )


def endpoint_from_catalog(node: Mapping[str, Any]) -> Endpoint:
    """One item of ``/v1/catalog/service/<name>``."""
    return Endpoint(
        id=node["ServiceID"],
        address=node.get("ServiceAddress") or node["Address"],
        port=int(node["ServicePort"]),
        tags=tuple(node.get("ServiceTags") or ()),
        meta=dict(node.get("ServiceMeta") or {}),
    )
