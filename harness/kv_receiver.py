"""A KV receiver in a child process of its own, driven over a pipe.

The benchmark and the integration tests need the receiver's memory in another process, as on a
real decode worker. The child zero-fills a ``[pages, layers, 2, page_size, heads, head_dim]``
cache (on ``device``), opens the receiver and sends back its handle; then it answers ``read`` (a copy of some
pages, to compare) and ``stop``. ``hosted=True`` (grpc only) puts the service on a grpc.aio
server that the child owns, the way a decode worker hosts it on its main port.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import signal
from types import TracebackType
from typing import Any

import torch

from pdmesh.engine.kv_cache import allocate_kv_cache
from pdmesh.kv_transfer.handle import ReceiverHandle, layout_of

_START_TIMEOUT_S = 120.0  # a spawned child imports torch first: seconds on a loaded 2-core box


def _open(
    backend: str, kv: torch.Tensor, host: str, options: dict[str, Any]
) -> Any:  # -> KVReceiver
    if backend == "raw":  # the benchmark's reference, not a backend of the registry
        from benchmarks.kv_reference.raw_socket import RawSocketReceiver

        return RawSocketReceiver.open(kv, layout_of(kv), host)
    from pdmesh.kv_transfer.registry import get_backend

    return get_backend(backend).receiver.open(kv, layout_of(kv), host, **options)


def _serve_commands(conn: multiprocessing.connection.Connection, kv: torch.Tensor) -> None:
    while True:
        cmd, arg = conn.recv()
        if cmd == "read":
            conn.send(kv[arg].cpu())
        elif cmd == "stop":
            return


def _child(
    conn: multiprocessing.connection.Connection,
    backend: str,
    shape: tuple[int, ...],
    dtype: str,
    host: str,
    options: dict[str, Any],
    hosted: bool,
    device: str,
) -> None:
    torch.set_num_threads(1)  # the copy is the work here; leave the cores to the transfer
    # allocated as the engine allocates its cache (on CUDA: shareable at link speed)
    kv = allocate_kv_cache(shape, getattr(torch, dtype), torch.device(device))
    try:
        if hosted:
            asyncio.run(_hosted(conn, kv, host))
            return
        receiver = _open(backend, kv, host, options)
    except Exception as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", receiver.handle))
    try:
        _serve_commands(conn, kv)
    finally:
        receiver.close()
    conn.send(("stopped", None))


async def _hosted(conn: multiprocessing.connection.Connection, kv: torch.Tensor, host: str) -> None:
    import grpc.aio

    from pdmesh.kv_transfer.grpc_backend import GrpcReceiver

    server = grpc.aio.server()
    port = server.add_insecure_port(f"{host}:0")
    receiver = GrpcReceiver.open(kv, layout_of(kv), host, address=f"{host}:{port}")
    receiver.add_to_server(server)
    await server.start()
    conn.send(("ok", receiver.handle))
    # the pipe blocks: wait for it on a thread while the loop serves the writes
    await asyncio.get_running_loop().run_in_executor(None, _serve_commands, conn, kv)
    receiver.close()
    await server.stop(0.5)
    conn.send(("stopped", None))


class ReceiverProcess:
    """``with ReceiverProcess("grpc", shape) as rp: sender.write(rp.handle, ...)``."""

    def __init__(
        self,
        backend: str,
        shape: tuple[int, ...],
        dtype: str = "float32",
        host: str = "127.0.0.1",
        options: dict[str, Any] | None = None,
        hosted: bool = False,
        device: str = "cpu",
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(
            target=_child,
            args=(child_conn, backend, shape, dtype, host, options or {}, hosted, device),
            name=f"kv-receiver-{backend}",
            daemon=True,
        )
        self.process.start()
        child_conn.close()
        status, value = self._reply(_START_TIMEOUT_S)
        if status != "ok":
            self.kill()
            raise RuntimeError(f"{backend} receiver process failed to open: {value}")
        self.handle: ReceiverHandle = value

    def _reply(self, timeout: float) -> tuple[str, Any]:
        try:
            if not self._conn.poll(timeout):
                raise TimeoutError(f"receiver process gave no answer within {timeout:g} s")
            reply: tuple[str, Any] = self._conn.recv()
        except EOFError:
            return ("error", f"the process exited (code {self.process.exitcode})")
        return reply

    def read(self, pages: list[int], timeout: float = 30.0) -> torch.Tensor:
        """A copy of ``kv[pages]`` as the receiver sees it (on the CPU)."""
        self._conn.send(("read", pages))
        if not self._conn.poll(timeout):
            raise TimeoutError(f"receiver process gave no pages within {timeout:g} s")
        data: torch.Tensor = self._conn.recv()
        return data

    def stop(self, timeout: float = 30.0) -> None:
        """Close the receiver and wait for the process to end."""
        if self.process.is_alive():
            try:
                self._conn.send(("stop", None))
                self._reply(timeout)
            except (OSError, EOFError, TimeoutError):
                pass
            self.process.join(timeout)
        self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crashed decode worker would die."""
        if self.process.is_alive() and self.process.pid is not None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(10)
        self._conn.close()

    def __enter__(self) -> ReceiverProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
