"""One gateway process: its app served by uvicorn until SIGTERM/SIGINT, on its own port or on
a socket its parent bound (``--workers``)."""

from __future__ import annotations

import gc
import math
import signal
import socket
import sys
from types import FrameType

import uvicorn

from pdmesh.discovery import ConsulError
from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.mesh import MeshOptions


def run(
    config: GatewayConfig,
    mesh: MeshOptions,
    sockets: list[socket.socket] | None = None,
    worker: int | None = None,
) -> int:
    """Serve until stopped; the exit code. ``sockets``: listen there instead of binding
    --host/--port; ``worker``: this process's index among --workers."""
    app = create_app(config, mesh.discovery, mesh.tls, worker=worker)
    freeze_startup_objects()
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_config=None,  # keep the one log format every pdmesh service uses
            log_level=config.log_level,
            timeout_graceful_shutdown=math.ceil(config.grace_period),
        )
    )
    # uvicorn handles SIGTERM/SIGINT itself while it serves; after its graceful shutdown it
    # restores the handlers it found and raises the signal again. Finding these, the process
    # exits 0 (as every pdmesh service does) instead of dying of the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    try:
        server.run(sockets=sockets)
    except ConsulError as e:  # e.g. an ACL token that may not register
        print(f"error: cannot register with Consul: {e}", file=sys.stderr)
        return 1
    return 0 if server.started else 1


def freeze_startup_objects() -> None:
    """Move everything alive now (the ~80k objects of the imported modules and the app, which
    live as long as the process) out of the garbage collector's reach: a full collection then
    scans only what serving made. Under streaming load the per-chunk allocations trigger one
    every few seconds, each ~50 ms of walking those objects on the 2-core machine (gc was ~7%
    of the gateway's CPU at 64 streams, py-spy). Garbage found now is collected first."""
    gc.collect()
    gc.freeze()


def _exit_cleanly(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
