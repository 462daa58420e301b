"""Proto ↔ ``pdmesh.pd`` values for the prefill worker's edge: the worker messages are the
decode worker's (``services.decode.convert``), the bootstrap ones are here."""

from __future__ import annotations

from pdmesh.pd import wire
from pdmesh.pd.values import FirstToken, Writing
from pdmesh.v1 import bootstrap_pb2


def event_to_pb(event: Writing | FirstToken) -> bootstrap_pb2.TransferEvent:
    if isinstance(event, Writing):
        return bootstrap_pb2.TransferEvent(writing=bootstrap_pb2.TransferWriting())
    return bootstrap_pb2.TransferEvent(done=wire.first_token_to_pb(event))
