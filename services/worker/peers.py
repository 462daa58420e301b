"""``GrpcPrefillPeers``: the decode worker's client of prefill bootstrap servers, the gRPC
implementation of ``pdmesh.pd.peers.PrefillPeers``.

One ``PrefillPeer`` per prefill address, created on first use, with one channel. It registers
this decode once (``RegisterDecode``: KV layout + transfer handle) and caches the prefill's
instance id; the registration is redone when the heartbeat reports the prefill lost or
restarted (``forget``) or a Transfer answers NOT_FOUND (the prefill does not know us).

Failed calls become typed errors naming the prefill, so the decode's Generate fails with a
message that says which prefill and why: FAILED_PRECONDITION / DEADLINE_EXCEEDED / ABORTED keep
their code; anything else (UNAVAILABLE, a broken stream, ...) means the prefill is gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
import grpc.aio

from pdmesh.errors import (
    AbortedError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidRequestError,
    PeerUnavailableError,
)
from pdmesh.pd.registry import DecodePeer
from pdmesh.pd.values import FirstToken
from pdmesh.rpc.server import MAX_MESSAGE_BYTES
from pdmesh.rpc.tls import PLAINTEXT, TLSConfig
from pdmesh.v1 import bootstrap_pb2, bootstrap_pb2_grpc
from services.worker import pd_convert

log = logging.getLogger(__name__)

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)


class GrpcPrefillPeer:
    def __init__(
        self,
        address: str,
        registration: Callable[[], DecodePeer],
        rpc_timeout: float,
        tls: TLSConfig = PLAINTEXT,
    ) -> None:
        self.address = address
        self.instance_id: str | None = None  # set once registered
        self._registration = registration
        self._rpc_timeout = rpc_timeout
        self._channel = tls.channel(address, options=CHANNEL_OPTIONS)
        self._stub = bootstrap_pb2_grpc.BootstrapServiceStub(self._channel)
        self._lock = asyncio.Lock()  # concurrent rooms register once

    async def ensure_registered(self) -> str:
        """Register with the prefill unless done already; returns its instance id."""
        async with self._lock:
            if self.instance_id is None:
                try:
                    request = pd_convert.decode_peer_to_pb(self._registration())
                    reply = await self._stub.RegisterDecode(request, timeout=self._rpc_timeout)
                except grpc.aio.AioRpcError as e:
                    raise self._error("registration", e) from e
                self.instance_id = reply.instance_id
                log.info(
                    "registered with prefill %s (instance %s), KV over %s",
                    self.address,
                    self.instance_id,
                    reply.transport or "an unnamed transport (an older prefill)",
                )
            return self.instance_id

    def forget(self) -> None:
        """Register again before the next room (the prefill was lost or restarted)."""
        self.instance_id = None

    async def transfer(
        self,
        room: int,
        page_ids: list[int],
        request_id: str,
        on_writing: Callable[[], None],
        timeout: float,
    ) -> FirstToken:
        """Send the room's destination pages and wait for its KV; ``on_writing`` is called when
        the prefill starts writing into the pages. Re-registers once if the prefill does not
        know this decode."""
        request = bootstrap_pb2.TransferRequest(
            room=room,
            decode_id=self._registration().decode_id,
            dst_page_ids=page_ids,
            request_id=request_id,
        )
        for attempt in (1, 2):
            try:
                return await self._transfer(request, on_writing, timeout)
            except grpc.aio.AioRpcError as e:
                if e.code() == grpc.StatusCode.NOT_FOUND and attempt == 1:
                    log.info(
                        "prefill %s does not know this decode; registering again", self.address
                    )
                    self.forget()
                    await self.ensure_registered()
                    continue
                raise self._error(f"transfer of bootstrap room {room}", e) from e
        raise AssertionError("unreachable")

    async def ping(self, timeout: float) -> str:
        """The prefill's instance id (raises grpc errors: the heartbeat counts them)."""
        reply = await self._stub.Ping(bootstrap_pb2.PingRequest(), timeout=timeout)
        return str(reply.instance_id)

    async def close(self) -> None:
        await self._channel.close()

    async def _transfer(
        self,
        request: bootstrap_pb2.TransferRequest,
        on_writing: Callable[[], None],
        timeout: float,
    ) -> FirstToken:
        call = self._stub.Transfer(request, timeout=timeout)
        try:
            async for event in call:
                kind = event.WhichOneof("event")
                if kind == "writing":
                    on_writing()
                elif kind == "done":
                    return pd_convert.first_token_from_pb(event.done)
        finally:
            call.cancel()  # a no-op once it ended; reaches the prefill when we give up early
        raise PeerUnavailableError(
            f"prefill {self.address} ended the transfer of bootstrap room {request.room} "
            "without an outcome"
        )

    def _error(self, what: str, e: grpc.aio.AioRpcError) -> Exception:
        code, details = e.code(), e.details() or ""
        message = f"prefill {self.address}: {details}"  # its own messages name the room
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            return FailedPreconditionError(message)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(message)
        if code == grpc.StatusCode.ABORTED:
            return AbortedError(message)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidRequestError("disagg", message)
        return PeerUnavailableError(
            f"lost prefill {self.address}: {what} failed: {code.name}: {details}"
        )


class GrpcPrefillPeers:
    def __init__(self, rpc_timeout: float, tls: TLSConfig = PLAINTEXT) -> None:
        """``rpc_timeout``: deadline of registrations; ``tls``: how the channels to bootstrap
        servers are secured. Set ``registration`` (what this decode registers with every
        prefill) once the decode's receiver address is known."""
        self.registration: DecodePeer | None = None
        self._rpc_timeout = rpc_timeout
        self._tls = tls
        self._peers: dict[str, GrpcPrefillPeer] = {}

    def get(self, address: str) -> GrpcPrefillPeer:
        peer = self._peers.get(address)
        if peer is None:
            peer = GrpcPrefillPeer(
                address, self._current_registration, self._rpc_timeout, self._tls
            )
            self._peers[address] = peer
        return peer

    def forget(self, address: str) -> None:
        peer = self._peers.get(address)
        if peer is not None:
            peer.forget()

    async def ping(self, address: str, timeout: float) -> str:
        return await self.get(address).ping(timeout)

    async def close(self) -> None:
        for peer in self._peers.values():
            await peer.close()

    def _current_registration(self) -> DecodePeer:
        if self.registration is None:
            raise PeerUnavailableError("this decode worker is still starting: not registered yet")
        return self.registration
