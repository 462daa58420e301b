"""``--workers N``: N gateway processes serving one HTTP port, for when one process's CPU is
not enough.

The parent binds the port (as uvicorn's own multi-process mode does) and starts N children with
multiprocessing's spawn — fresh interpreters, so no grpc or OpenTelemetry state is copied by a
fork. Each child builds its own app (its own router channels and streams, its own metrics) and
serves the inherited socket; the kernel gives each new connection to one of them.

Consul: child k registers itself as ``<id>-<k>`` (``--service-id``, else the usual
``gateway-<address>-<port>``) with meta ``metrics_port`` naming a /metrics port of its own (a
free one), so Prometheus scrapes every process through http_sd; /metrics on the shared HTTP
port answers for whichever process takes the connection.

SIGTERM/SIGINT to the parent: SIGTERM to every child (uvicorn's graceful shutdown within
--grace-period), then exit 0. A child that exits by itself stops the others and the parent
exits 1, for whatever supervises the gateway to restart it whole. A child whose parent died
(its end of a pipe closes) stops itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import threading
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType

from pdmesh.rpc.server import configure_logging
from services.gateway import serve
from services.gateway.config import GatewayConfig
from services.mesh import MeshOptions

log = logging.getLogger(__name__)

POLL_S = 0.5  # how often the parent looks for a signal while waiting on its children
KILL_AFTER_S = 5.0  # past --grace-period, a child that has not exited is killed

_spawn = multiprocessing.get_context("spawn")


def run(config: GatewayConfig, mesh: MeshOptions) -> int:
    sock = bind(config.host, config.port)
    # the port the children serve and register (--port 0: the free one bound here)
    config = dataclasses.replace(config, port=sock.getsockname()[1])
    stopping: list[int] = []

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stopping.append(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    children = [_start(config, mesh, sock, k) for k in range(config.workers)]
    log.info(
        "gateway on http://%s:%d with %d worker processes (pids %s)",
        config.host,
        config.port,
        len(children),
        ", ".join(str(c.pid) for c, _ in children),
    )
    code = 0
    while not stopping:
        ended = wait([c.sentinel for c, _ in children], timeout=POLL_S)
        if ended:
            dead = [c for c, _ in children if c.sentinel in ended]
            for child in dead:
                log.error(
                    "gateway worker %s exited with %s; stopping the others",
                    child.pid,
                    child.exitcode,
                )
            code = 1
            break
    _stop(children, config.grace_period + KILL_AFTER_S)
    sock.close()
    return code


def bind(host: str, port: int) -> socket.socket:
    """A listening socket the children inherit (uvicorn binds the same way)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


def _start(
    config: GatewayConfig, mesh: MeshOptions, sock: socket.socket, index: int
) -> tuple[BaseProcess, Connection]:
    parent_end, child_end = _spawn.Pipe()
    child = _spawn.Process(
        target=_child,
        args=(config, mesh, sock, index, child_end),
        name=f"gateway-worker-{index}",
    )
    child.start()
    child_end.close()  # the child holds the only other end: it sees EOF when we die
    return child, parent_end


def _stop(children: list[tuple[BaseProcess, Connection]], limit_s: float) -> None:
    for child, _ in children:
        if child.exitcode is None and child.pid is not None:
            os.kill(child.pid, signal.SIGTERM)
    for child, pipe in children:
        child.join(limit_s)
        if child.exitcode is None:
            log.error("gateway worker %s did not stop in %.0f s; killing it", child.pid, limit_s)
            child.kill()
            child.join()
        pipe.close()


def _child(
    config: GatewayConfig,
    mesh: MeshOptions,
    sock: socket.socket,
    index: int,
    parent: Connection,
) -> None:
    configure_logging(config.log_level)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    raise SystemExit(serve.run(config, mesh, sockets=[sock], worker=index))


def _watch_parent(parent: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        parent.recv()  # nothing is ever sent: returns (raises) when the parent is gone
    os.kill(os.getpid(), signal.SIGTERM)
