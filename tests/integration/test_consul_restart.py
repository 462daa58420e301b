"""A Consul agent that restarts empty (a dev agent, or one without its data dir) must not make
watchers drop instances that are alive and about to register again: right after the agent is
back, the watch keeps delivering instances it does not list yet, for the time their keepers
need to register them again (``ConsulDiscovery.settle_s``). An instance that does not come back
is dropped once that time is over. Real ``consul agent -dev``, real grpc servers."""

from __future__ import annotations

import asyncio
import time

from pdmesh.discovery import ConsulDiscovery, ServiceRegistration
from pdmesh.discovery.dev_agent import ConsulDevAgent
from tests.integration.test_consul_discovery import Recorder, start_server

CHECK_S = 1.0
RESYNC_S = 1.5
RETRY_MAX_S = 1.0


def test_a_restarted_empty_agent_does_not_empty_the_watch() -> None:
    with ConsulDevAgent() as agent:

        async def scenario() -> None:
            def discovery() -> ConsulDiscovery:
                return ConsulDiscovery(
                    agent.http_addr,
                    check_interval=CHECK_S,
                    resync_interval=RESYNC_S,
                    retry_min=0.2,
                    retry_max=RETRY_MAX_S,
                    # a blocking query the agent's restart left parked (aiohttp sends it again
                    # on a new connection) returns within this
                    watch_wait=2.0,
                )

            kept_rpc, kept_port = await start_server()
            gone_rpc, gone_port = await start_server()
            kept = ServiceRegistration("pdmesh-test-restart", "127.0.0.1", kept_port)
            gone = ServiceRegistration("pdmesh-test-restart", "127.0.0.1", gone_port)
            watcher = discovery()
            keeper = discovery()  # keeps `kept` registered
            lost = discovery()  # registers `gone` once only
            seen = Recorder()
            watcher.watch(kept.name, None, seen)
            try:
                await keeper.register(kept)
                await lost.register(gone)
                both = {kept.service_id, gone.service_id}
                await seen.until(lambda ids: ids == both)
                await lost.close()  # its keeper stops: after the restart nobody registers it
                before = len(seen.sets)

                await asyncio.to_thread(agent.kill)
                await asyncio.to_thread(agent.start)
                back = time.monotonic()
                # `kept` is registered again by its keeper and passes its check ...
                registered = await _until_passing(agent, kept.service_id)
                assert registered < watcher.settle_s, "the keeper is slower than the window"
                # ... and meanwhile the watch never lost it
                assert all(kept.service_id in {e.id for e in s} for s in seen.sets[before:])
                # `gone` stays away: dropped once the window is over, not before
                await seen.until(lambda ids: ids == {kept.service_id}, watcher.settle_s + 10)
                dropped = time.monotonic() - back
                assert dropped >= watcher.settle_s - 1.0, f"dropped after {dropped:.1f}s"
            finally:
                await watcher.close()
                await keeper.close()
                await kept_rpc.stop(0)
                await gone_rpc.stop(0)

        async def _until_passing(agent: ConsulDevAgent, service_id: str) -> float:
            start = time.monotonic()
            path = "/v1/health/service/pdmesh-test-restart?passing=1"
            while True:
                entries = await asyncio.to_thread(agent.get, path)
                assert isinstance(entries, list)
                if any(e["Service"]["ID"] == service_id for e in entries):
                    return time.monotonic() - start
                assert time.monotonic() - start < 30, "never registered again"
                await asyncio.sleep(0.1)

        asyncio.run(scenario())
