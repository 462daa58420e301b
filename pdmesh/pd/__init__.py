"""Prefill/decode disaggregation: the parts of the protocol that are not wire or engine.

Prefill side: ``rooms`` (the room table where the two halves of a request meet, with the
bootstrap timeout), ``registry`` (registered decode workers, KV layout checks), ``bootstrap``
(RegisterDecode / Transfer logic behind the gRPC servicer), ``budget`` (how much of the pool may
be prefilled before the decode is ready), ``prefill`` (one request: prefill, wait for the
decode's pages, write the KV, hand over the first token).

Decode side: ``peers`` (Python protocols for the prefill workers a decode registers with once,
transfers from and pings; the gRPC implementation is ``services.worker.peers``), ``heartbeat`` (fails every room of a prefill that stops answering or restarts),
``decode`` (one request: allocate pages, get the KV and first token, then decode locally
through ``AsyncEngine.decode_incoming``).

``sides``: both sides wired up on a worker's engine (what the worker's roles open).

``values``: what flows between them (``FirstToken``, ``RemotePrefill``). No proto type appears
here: the conversions are the worker service's (``services.worker.pd_convert``).
"""
