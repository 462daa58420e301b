"""Starting one request disaggregated: the same request, with one bootstrap room, to a prefill P
and a decode D at the same time.

P's stream is drained in the background (its end means the KV reached D, or it failed); D's
stream is what the client gets. Until D's first message, whichever side fails first decides:
the other call is cancelled at once (the worker aborts its half and frees its pages) and the
client gets the failing side's error, naming that worker. After D's first token P no longer
matters: D holds the whole prompt's KV.

NOTE: no retry here: ``start`` says which side failed (``SideFailed``) and the caller decides
(``Generation._start_disaggregated`` runs the attempt loop, ``pdmesh.routing.attempts``: it
re-picks the pair, ``pdmesh.routing.pd_pair``, and ``start`` draws a new room for every attempt,
as SGLang's router does), charging only the failed side's circuit breaker. P's half is a call of
its own (``WorkerClient.own_call``), D's goes where the decode's client sends generations.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

import grpc
import grpc.aio

from pdmesh.v1 import worker_pb2
from services.router.upstream import OutgoingCalls, UpstreamError
from services.router.worker_client import GenerationCall, OwnCall
from services.router.workers import WorkerHandle

log = logging.getLogger(__name__)

ROOM_BITS = 63  # rooms are uint64 on the wire; 63 bits keep them positive in every language


@dataclass
class Started:
    """A disaggregated request whose decode has sent its first message."""

    decode: WorkerHandle
    call: GenerationCall
    first: worker_pb2.GenerateResponse
    room: int
    prefill_done: asyncio.Task[worker_pb2.GenerateResponse | None]  # drains P; never raises


class SideFailed(UpstreamError):
    """``worker``'s call failed before the decode's first message; both halves were cancelled,
    so the request may start again on another pair."""

    def __init__(self, worker: WorkerHandle, error: grpc.aio.AioRpcError) -> None:
        failed = UpstreamError.from_rpc(worker.label, error)
        super().__init__(failed.code, failed.details, failed.detail)
        self.worker = worker


class Unreachable(SideFailed):
    """``worker`` could not be reached (UNAVAILABLE)."""


def _failure(worker: WorkerHandle, error: grpc.aio.AioRpcError) -> SideFailed:
    if error.code() == grpc.StatusCode.UNAVAILABLE:
        return Unreachable(worker, error)
    return SideFailed(worker, error)


def new_room() -> int:
    return secrets.randbits(ROOM_BITS)


async def start(
    request: worker_pb2.GenerateRequest,
    prefill: WorkerHandle,
    decode: WorkerHandle,
    timeout: float,
    calls: OutgoingCalls,
) -> Started:
    """Send ``request`` to both workers and wait for D's first message; raises
    ``UpstreamError`` naming the side that failed first."""
    room = new_room()
    p_request = worker_pb2.GenerateRequest()
    p_request.CopyFrom(request)
    p_request.disagg.bootstrap_room = room
    d_request = worker_pb2.GenerateRequest()
    d_request.CopyFrom(p_request)
    d_request.disagg.bootstrap_address = prefill.bootstrap_address
    d_request.disagg.prefill_worker_id = prefill.id
    p_call: OwnCall = calls.track(prefill.client.own_call(p_request, timeout))
    d_call: GenerationCall = calls.track(decode.generate(d_request, timeout))
    log.debug(
        "request %s: room %d, %s -> %s", request.request_id, room, prefill.label, decode.label
    )

    p_outcome: asyncio.Future[worker_pb2.GenerateResponse | grpc.aio.AioRpcError] = (
        asyncio.ensure_future(_drain(p_call))
    )
    d_first = asyncio.ensure_future(d_call.read())
    try:
        await asyncio.wait({p_outcome, d_first}, return_when=asyncio.FIRST_COMPLETED)
        if not d_first.done():  # P ended first: fine if it succeeded, D's token is on its way
            p_result = p_outcome.result()
            if isinstance(p_result, grpc.aio.AioRpcError):
                d_call.cancel()
                raise _failure(prefill, p_result) from p_result
            # waited for, not awaited: a failed D must raise as _first_of names it (SideFailed,
            # so the request is retried), not as a bare grpc error
            await asyncio.wait({d_first})
        first = _first_of(d_first, decode)
    except BaseException:
        p_call.cancel()
        d_call.cancel()
        d_first.cancel()
        raise
    return Started(decode, d_call, first, room, asyncio.ensure_future(_last(p_outcome)))


async def _drain(call: OwnCall) -> worker_pb2.GenerateResponse | grpc.aio.AioRpcError:
    """P's last message, or its error (returned, not raised: nobody may be left to read it)."""
    last = None
    try:
        async for reply in call:
            last = reply
    except grpc.aio.AioRpcError as e:
        return e
    if last is None:
        return grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="the prefill ended its stream without a message",
        )
    return last


async def _last(
    outcome: asyncio.Future[worker_pb2.GenerateResponse | grpc.aio.AioRpcError],
) -> worker_pb2.GenerateResponse | None:
    result = await outcome
    return None if isinstance(result, grpc.aio.AioRpcError) else result


def _first_of(
    d_first: asyncio.Future[worker_pb2.GenerateResponse | grpc.aio.EOFType], decode: WorkerHandle
) -> worker_pb2.GenerateResponse:
    try:
        reply = d_first.result()
    except grpc.aio.AioRpcError as e:
        raise _failure(decode, e) from e
    if reply is grpc.aio.EOF:
        raise UpstreamError(
            grpc.StatusCode.INTERNAL, f"{decode.label} ended the stream without a finish reason"
        )
    assert isinstance(reply, worker_pb2.GenerateResponse)
    return reply
