"""The ``grpc`` backend: KV bytes streamed to a ``pdmesh.v1.KVReceiverService``.

For hosts without Mooncake, and the baseline of the transfer benchmark. The decode worker hosts
the service on its main gRPC server (``open(..., address=its address)`` then
``add_to_server(server)`` before the server starts), or the receiver serves it on a port of its
own from a background thread. The sender coalesces pages like the mooncake backend, and packs
the blocks into chunks under gRPC's default 4 MiB message limit, so any server can host it.
The receiver copies each segment straight into the KV cache tensor at its byte offset.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import grpc.aio
import numpy as np
import torch

from pdmesh.engine.kv_cache import KVLayout
from pdmesh.kv_transfer.base import DEFAULT_TIMEOUT_S, KVReceiver, KVSender
from pdmesh.kv_transfer.coalesce import Block
from pdmesh.kv_transfer.errors import KVTransferError
from pdmesh.kv_transfer.handle import ReceiverHandle, TransferStats, check_cache
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.v1 import kv_transfer_pb2, kv_transfer_pb2_grpc

SERVICE_NAME = "pdmesh.v1.KVReceiverService"
# Payload per PageChunk. The segment list (16 bytes per segment) and framing ride on top, and
# 64 KiB of headroom keeps a whole message under gRPC's default 4 MiB receive limit even for
# thousands of single-page segments.
MAX_CHUNK_BYTES = 4 * 1024 * 1024 - 64 * 1024
_START_TIMEOUT_S = 10.0
CHANNEL_OPTIONS = (
    # A receiver that stops reading (hung host, SIGSTOP) leaves the connection wedged with
    # unsent data: our deadline fails the write, but grpc.aio then waits for that transport
    # when the event loop closes, forever. HTTP/2 keepalive tears it down within ~15 s. Ten
    # seconds stays clear of the server's ping-abuse policy: with its defaults only a single
    # write lasting over ~40 s (beyond any sane deadline) would draw a GOAWAY.
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # a channel of its own per receiver: a fresh channel after a failure must not pick the
    # wedged connection back up from grpc's process-wide subchannel pool
    ("grpc.use_local_subchannel_pool", 1),
)


def flat_bytes(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache as one flat uint8 tensor sharing its memory (byte offsets index it)."""
    return kv_cache.view(torch.uint8).reshape(-1)


class KVReceiverServicer(kv_transfer_pb2_grpc.KVReceiverServiceServicer):
    """Writes incoming chunks into one KV cache; refuses chunks meant for another receiver."""

    def __init__(self, kv_cache: torch.Tensor, receiver_id: str) -> None:
        self.receiver_id = receiver_id
        self.closed = False
        self._flat = flat_bytes(kv_cache)
        # on CPU a numpy view takes each segment with one memcpy and no tensor per segment
        self._np = self._flat.numpy() if self._flat.device.type == "cpu" else None

    async def WritePages(
        self, request_iterator: AsyncIterator[kv_transfer_pb2.PageChunk], context: Any
    ) -> kv_transfer_pb2.WritePagesReply:
        written = segments = 0
        async for chunk in request_iterator:
            if self.closed:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "KV receiver is closed")
            if chunk.receiver_id != self.receiver_id:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"write for KV receiver {chunk.receiver_id!r}, this is {self.receiver_id!r} "
                    "(the receiver restarted: register again)",
                )
            if error := self._check(chunk):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            self._apply(chunk)
            written += len(chunk.data)
            segments += len(chunk.lengths)
        return kv_transfer_pb2.WritePagesReply(bytes_written=written, segments=segments)

    def _check(self, chunk: kv_transfer_pb2.PageChunk) -> str | None:
        if len(chunk.dst_offsets) != len(chunk.lengths):
            return f"{len(chunk.dst_offsets)} dst_offsets but {len(chunk.lengths)} lengths"
        if sum(chunk.lengths) != len(chunk.data):
            return f"lengths add up to {sum(chunk.lengths)} bytes, data has {len(chunk.data)}"
        size = self._flat.numel()
        for off, n in zip(chunk.dst_offsets, chunk.lengths):
            if off + n > size:
                return f"segment [{off}, {off + n}) is outside the {size}-byte KV cache"
        return None

    def _apply(self, chunk: kv_transfer_pb2.PageChunk) -> None:
        data = chunk.data
        pos = 0
        for off, n in zip(chunk.dst_offsets, chunk.lengths):
            src = np.frombuffer(data, dtype=np.uint8, count=n, offset=pos)
            if self._np is not None:
                self._np[off : off + n] = src
            else:
                with warnings.catch_warnings():  # read-only source: torch only reads it here
                    warnings.simplefilter("ignore", UserWarning)
                    self._flat[off : off + n].copy_(torch.from_numpy(src))
            pos += n


class _ServerThread:
    """A grpc.aio server with its own event loop on a daemon thread, for a receiver that is not
    hosted on the worker's server (tests, the benchmark)."""

    def __init__(self, servicer: KVReceiverServicer, bind: str, tls: TLSConfig) -> None:
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._run, name="kv-receiver-grpc", daemon=True)
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(
                self._start(servicer, bind), self._loop
            ).result(_START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    async def _start(self, servicer: KVReceiverServicer, bind: str) -> int:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        kv_transfer_pb2_grpc.add_KVReceiverServiceServicer_to_server(servicer, self._server)
        port = self._tls.add_port(self._server, bind)
        await self._server.start()
        return port

    def stop(self) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0.5), self._loop).result(5)
            self._server = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


class GrpcReceiver(KVReceiver):
    backend = "grpc"

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        address: str | None,
        port: int,
        tls: TLSConfig = PLAINTEXT,
    ) -> None:
        self.kv_cache = kv_cache
        self.servicer = KVReceiverServicer(kv_cache, uuid.uuid4().hex)
        self._thread: _ServerThread | None = None
        if address is None:
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                self._thread = _ServerThread(self.servicer, bind, tls)
            except Exception as e:
                raise KVTransferError(f"cannot serve KVReceiverService on {bind}: {e}", bind) from e
            address = bind.rsplit(":", 1)[0] + f":{self._thread.port}"
        self._handle = ReceiverHandle(self.backend, address, self.servicer.receiver_id, layout)

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        address: str | None = None,
        port: int = 0,
        tls: TLSConfig = PLAINTEXT,
    ) -> GrpcReceiver:
        """Without ``address``: serve on ``host:port`` (0 = a free port) from a thread of its
        own, with ``tls``. With ``address`` (``host:port`` of the caller's grpc.aio server):
        serve nothing yet; call ``add_to_server`` on that server before it starts (it is then
        as secure as that server's port)."""
        check_cache(kv_cache, layout)
        return cls(kv_cache, layout, host, address, port, tls)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        """Host ``pdmesh.v1.KVReceiverService`` on ``server`` (``SERVICE_NAME`` for health and
        reflection). Its receive limit must allow 4 MiB messages (gRPC's default does)."""
        kv_transfer_pb2_grpc.add_KVReceiverServiceServicer_to_server(self.servicer, server)

    @property
    def handle(self) -> ReceiverHandle:
        return self._handle

    def close(self) -> None:
        self.servicer.closed = True
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


class GrpcSender(KVSender):
    backend = "grpc"

    def __init__(
        self,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        chunk_bytes: int,
        tls: TLSConfig = PLAINTEXT,
    ) -> None:
        super().__init__(kv_cache, layout)
        self.tls = tls
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes={chunk_bytes} must be in (0, {MAX_CHUNK_BYTES}]")
        self.chunk_bytes = chunk_bytes
        self._flat = flat_bytes(kv_cache)
        self._np = self._flat.numpy() if self._flat.device.type == "cpu" else None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # grpc.aio channels are per loop
        self._closed = False

    @classmethod
    def open(
        cls,
        kv_cache: torch.Tensor,
        layout: KVLayout,
        host: str,
        *,
        chunk_bytes: int = MAX_CHUNK_BYTES,
        tls: TLSConfig = PLAINTEXT,
    ) -> GrpcSender:
        """``host`` is unused: a gRPC client needs no endpoint of its own. ``tls``: how the
        channels to receivers are secured (receivers hosted on a worker's TLS port need it)."""
        check_cache(kv_cache, layout)
        return cls(kv_cache, layout, chunk_bytes, tls)

    async def write(
        self,
        dest: ReceiverHandle,
        src_pages: list[int],
        dst_pages: list[int],
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> TransferStats:
        if self._closed:
            raise KVTransferError("grpc sender is closed", peer=dest.address)
        blocks = self.plan(dest, src_pages, dst_pages)
        nbytes = sum(length for _, _, length in blocks)
        start = time.perf_counter()
        if blocks:
            stub = kv_transfer_pb2_grpc.KVReceiverServiceStub(self._channel(dest.address))
            try:
                reply = await stub.WritePages(
                    self._chunks(dest.receiver_id, blocks), timeout=timeout
                )
            except grpc.aio.AioRpcError as e:
                if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    # a channel in reconnect backoff (or on a wedged connection) would fail the
                    # next writes too, even to a receiver restarted at the same address
                    await self._drop_channel(dest.address)
                raise KVTransferError(
                    f"grpc write of {nbytes} bytes to KV receiver {dest.address} failed: "
                    f"{e.code().name}: {e.details()}",
                    peer=dest.address,
                ) from None
            if reply.bytes_written != nbytes:
                raise KVTransferError(
                    f"KV receiver {dest.address} took {reply.bytes_written} of {nbytes} bytes",
                    peer=dest.address,
                )
        return TransferStats(
            nbytes, len(src_pages), len(blocks), time.perf_counter() - start, self.backend
        )

    def _chunks(self, receiver_id: str, blocks: list[Block]) -> Iterator[kv_transfer_pb2.PageChunk]:
        """Blocks packed into chunks of at most ``chunk_bytes``; a long block spans chunks."""
        offsets: list[int] = []
        lengths: list[int] = []
        parts: list[Any] = []
        size = 0
        for src, dst, length in blocks:
            done = 0
            while done < length:
                take = min(length - done, self.chunk_bytes - size)
                offsets.append(dst + done)
                lengths.append(take)
                parts.append(self._read(src + done, take))
                size += take
                done += take
                if size == self.chunk_bytes:
                    yield self._chunk(receiver_id, offsets, lengths, parts)
                    offsets, lengths, parts, size = [], [], [], 0
        if size:
            yield self._chunk(receiver_id, offsets, lengths, parts)

    def _read(self, offset: int, length: int) -> Any:
        if self._np is not None:
            return self._np[offset : offset + length]  # a view; copied once by the join
        return self._flat[offset : offset + length].cpu().numpy()

    @staticmethod
    def _chunk(
        receiver_id: str, offsets: list[int], lengths: list[int], parts: list[Any]
    ) -> kv_transfer_pb2.PageChunk:
        data = parts[0].tobytes() if len(parts) == 1 else b"".join(parts)
        return kv_transfer_pb2.PageChunk(
            receiver_id=receiver_id, dst_offsets=offsets, lengths=lengths, data=data
        )

    def _channel(self, address: str) -> grpc.aio.Channel:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # the old loop's channels cannot be used (nor closed) here
            self._channels.clear()
            self._loop = loop
        channel = self._channels.get(address)
        if channel is None:
            channel = self.tls.channel(address, options=CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    async def _drop_channel(self, address: str) -> None:
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        self._closed = True
        for address in list(self._channels):
            await self._drop_channel(address)
