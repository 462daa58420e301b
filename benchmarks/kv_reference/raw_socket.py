"""A plain loopback-TCP copy of the same bytes: the benchmark's reference, not a backend.

It does what any transfer of these bytes over one TCP connection must do and nothing more: the
sender writes each block straight from its cache (a memoryview, no staging copy) and the
receiver reads each block straight into its cache (``recv_into``), so the kernel's two copies
are the whole cost. Per write: a header with the segment list, the payloads, an 8-byte ack.

The sender is a non-blocking socket on the event loop: the bytes start moving in the write call
itself and the loop wakes on the ack, with no thread hop either way. The sender on a worker
thread that was the reference before (``ThreadedRawSocketSender``, the benchmark's
``raw-thread``) moved 1.4-2.8 MiB rooms at 0.78-0.90 of this one's speed by the median of 5
runs on a 2-core host (0.66-1.24 per run; alike from 11 MiB): the hops, not the copy, and a
reference must not be slowed by costs that are no part of moving the bytes. The receiver, in
its own process like a decode worker, reads with blocking sockets on threads. CPU tensors only.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats, check_cache

_COUNT = struct.Struct("<I")
_SEGMENT = struct.Struct("<QQ")
_ACK = struct.Struct("<Q")


def _flat_np(kv_cache: torch.Tensor) -> memoryview:
    if kv_cache.device.type != "cpu":
        raise ValueError("the raw socket baseline copies CPU tensors only")
    return kv_cache.view(torch.uint8).reshape(-1).numpy().data


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise ConnectionError("peer closed the connection")
        got += n


class RawSocketReceiver(KVReceiver):
    backend = "raw"

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> None:
        self.kv_cache = kv_cache
        self._mem = _flat_np(kv_cache)
        self._listener = socket.create_server((host, 0))
        port = self._listener.getsockname()[1]
        self._handle = ReceiverHandle(self.backend, f"{host}:{port}", uuid.uuid4().hex, layout)
        self._closed = False
        threading.Thread(target=self._accept, name="raw-kv-accept", daemon=True).start()

    @classmethod
    def open(cls, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> RawSocketReceiver:
        check_cache(kv_cache, layout)
        return cls(kv_cache, layout, host)

    @property
    def handle(self) -> ReceiverHandle:
        return self._handle

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                while True:
                    head = bytearray(_COUNT.size)
                    _recv_exact(conn, memoryview(head))
                    (count,) = _COUNT.unpack(head)
                    table = bytearray(count * _SEGMENT.size)
                    _recv_exact(conn, memoryview(table))
                    total = 0
                    for off, length in _SEGMENT.iter_unpack(table):
                        _recv_exact(conn, self._mem[off : off + length])
                        total += length
                    conn.sendall(_ACK.pack(total))
            except (ConnectionError, OSError):
                return

    def close(self) -> None:
        self._closed = True
        self._listener.close()


class RawSocketSender(KVSender):
    backend = "raw"

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        super().__init__(kv_cache, layout)
        self._mem = _flat_np(kv_cache)
        self._socks: dict[str, socket.socket] = {}
        # one connection per receiver: concurrent writes to it must not interleave their bytes
        self._locks: dict[str, asyncio.Lock] = {}

    @classmethod
    def open(cls, kv_cache: torch.Tensor, layout: KVLayout, host: str) -> RawSocketSender:
        check_cache(kv_cache, layout)
        return cls(kv_cache, layout)

    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        blocks = self.plan(dest, src_pages, dst_pages)
        nbytes = sum(length for _, _, length in blocks)
        start = time.perf_counter()
        lock = self._locks.setdefault(dest.address, asyncio.Lock())
        try:
            async with lock:
                await asyncio.wait_for(self._send(dest.address, blocks), timeout)
        except (OSError, asyncio.TimeoutError) as e:
            # a write cut short leaves the stream mid-message: the next one reconnects
            sock = self._socks.pop(dest.address, None)
            if sock is not None:
                sock.close()
            raise KVTransferError(f"raw write to {dest.address} failed: {e!r}", dest.address) from e
        return TransferStats(
            nbytes, len(src_pages), len(blocks), time.perf_counter() - start, self.backend
        )

    async def _send(self, address: str, blocks: list[tuple[int, int, int]]) -> None:
        loop = asyncio.get_running_loop()
        sock = self._socks.get(address)
        if sock is None:
            host, port = address.rsplit(":", 1)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            self._socks[address] = sock
            await loop.sock_connect(sock, (host, int(port)))
        table = b"".join(_SEGMENT.pack(dst, length) for _, dst, length in blocks)
        await loop.sock_sendall(sock, _COUNT.pack(len(blocks)) + table)
        for src, _, length in blocks:
            await loop.sock_sendall(sock, self._mem[src : src + length])
        ack = memoryview(bytearray(_ACK.size))
        got = 0
        while got < len(ack):
            n = await loop.sock_recv_into(sock, ack[got:])
            if n == 0:
                raise ConnectionError("the receiver closed the connection")
            got += n

    async def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()


class ThreadedRawSocketSender(RawSocketSender):
    """The same copy with blocking sockets on a worker thread, the reference until the sender
    above replaced it: the benchmark's ``raw-thread`` arm, kept to show what the hop to a
    thread and back costs beside ``raw`` in the same run."""

    def __init__(self, kv_cache: torch.Tensor, layout: KVLayout) -> None:
        super().__init__(kv_cache, layout)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raw-kv-write")

    async def _send(self, address: str, blocks: list[tuple[int, int, int]]) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._send_blocking, address, blocks)

    def _send_blocking(self, address: str, blocks: list[tuple[int, int, int]]) -> None:
        # a write given up at its deadline closes the socket, which ends this thread's wait
        sock = self._socks.get(address)
        if sock is None:
            host, port = address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)))
            self._socks[address] = sock
        table = b"".join(_SEGMENT.pack(dst, length) for _, dst, length in blocks)
        sock.sendall(_COUNT.pack(len(blocks)) + table)
        for src, _, length in blocks:
            sock.sendall(self._mem[src : src + length])
        _recv_exact(sock, memoryview(bytearray(_ACK.size)))

    async def close(self) -> None:
        await super().close()
        self._pool.shutdown(wait=False)
