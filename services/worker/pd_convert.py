"""``pdmesh.pd`` values ↔ bootstrap.proto messages, shared by the prefill role's
``BootstrapServicer`` and the decode role's ``GrpcPrefillPeers``: the edge where PD values meet
proto types (``pdmesh.pd`` itself holds none)."""

from __future__ import annotations

from pdmesh.engine.sequence import TokenLogprob
from pdmesh.errors import InvalidRequestError
from pdmesh.kv_transfer import ReceiverHandle
from pdmesh.pd.registry import DecodePeer
from pdmesh.pd.values import FirstToken, Writing
from pdmesh.v1 import bootstrap_pb2, common_pb2
from services.worker.kv_convert import handle_from_pb, handle_to_pb


def registration_to_pb(
    decode_id: str, decode_address: str, receivers: list[ReceiverHandle]
) -> bootstrap_pb2.RegisterDecodeRequest:
    """``receivers``: the decode's handles, fastest first."""
    return bootstrap_pb2.RegisterDecodeRequest(
        decode_id=decode_id,
        receiver=handle_to_pb(receivers[0]),
        decode_address=decode_address,
        alternatives=[handle_to_pb(h) for h in receivers[1:]],
    )


def decode_peer_to_pb(peer: DecodePeer) -> bootstrap_pb2.RegisterDecodeRequest:
    """What a decode registers as, on the wire (``registration_from_pb`` reads it back)."""
    return registration_to_pb(peer.decode_id, peer.address, [peer.receiver, *peer.alternatives])


def registration_from_pb(pb: bootstrap_pb2.RegisterDecodeRequest) -> DecodePeer:
    if not pb.decode_id:
        raise InvalidRequestError("decode_id", "must not be empty")
    if not pb.HasField("receiver"):
        raise InvalidRequestError("receiver", "must be set")
    return DecodePeer(
        pb.decode_id,
        pb.decode_address,
        handle_from_pb(pb.receiver),
        tuple(handle_from_pb(h) for h in pb.alternatives),
    )


def logprob_to_pb(lp: TokenLogprob) -> common_pb2.TokenLogprob:
    return common_pb2.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[common_pb2.TopLogprob(token_id=t, logprob=p) for t, p in lp.top],
    )


def logprob_from_pb(pb: common_pb2.TokenLogprob) -> TokenLogprob:
    return TokenLogprob(pb.token_id, pb.logprob, tuple((t.token_id, t.logprob) for t in pb.top))


def first_token_to_pb(first: FirstToken) -> bootstrap_pb2.TransferDone:
    pb = bootstrap_pb2.TransferDone(
        first_token=first.token_id,
        cached_tokens=first.num_cached_tokens,
        bytes=first.num_bytes,
        transfer_seconds=first.seconds,
    )
    if first.logprob is not None:
        pb.logprob.CopyFrom(logprob_to_pb(first.logprob))
    return pb


def first_token_from_pb(pb: bootstrap_pb2.TransferDone) -> FirstToken:
    return FirstToken(
        token_id=pb.first_token,
        logprob=logprob_from_pb(pb.logprob) if pb.HasField("logprob") else None,
        num_cached_tokens=pb.cached_tokens,
        num_bytes=pb.bytes,
        seconds=pb.transfer_seconds,
    )


def event_to_pb(event: Writing | FirstToken) -> bootstrap_pb2.TransferEvent:
    if isinstance(event, Writing):
        return bootstrap_pb2.TransferEvent(writing=bootstrap_pb2.TransferWriting())
    return bootstrap_pb2.TransferEvent(done=first_token_to_pb(event))
