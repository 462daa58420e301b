"""A plain loopback-TCP copy of the same bytes: the benchmark's reference, not a backend.

It does what any transfer of these bytes over one TCP connection must do and nothing more: the
sender writes each block straight from its cache (``sendall`` of a memoryview, no staging copy)
and the receiver reads each block straight into its cache (``recv_into``), so the kernel's two
copies are the whole cost. Per write: a header with the segment list, the payloads, an 8-byte
ack. Blocking sockets on threads; CPU tensors only.
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

from pdmesh.engine.outputs import KVLayout
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
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="raw-kv-write")

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
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._send, dest.address, blocks, timeout),
                timeout,
            )
        except (OSError, asyncio.TimeoutError) as e:
            self._socks.pop(dest.address, None)
            raise KVTransferError(f"raw write to {dest.address} failed: {e!r}", dest.address) from e
        return TransferStats(
            nbytes, len(src_pages), len(blocks), time.perf_counter() - start, self.backend
        )

    def _send(self, address: str, blocks: list[tuple[int, int, int]], timeout: float) -> None:
        sock = self._socks.get(address)
        if sock is None:
            host, port = address.rsplit(":", 1)
            sock = socket.create_connection((host, int(port)), timeout=timeout)
            self._socks[address] = sock
        sock.settimeout(timeout)
        table = b"".join(_SEGMENT.pack(dst, length) for _, dst, length in blocks)
        sock.sendall(_COUNT.pack(len(blocks)) + table)
        for src, _, length in blocks:
            sock.sendall(self._mem[src : src + length])
        ack = bytearray(_ACK.size)
        _recv_exact(sock, memoryview(ack))

    async def close(self) -> None:
        for sock in self._socks.values():
            sock.close()
        self._socks.clear()
        self._pool.shutdown(wait=False)
