"""Prefill/decode disaggregation: the parts of the protocol that are not wire or engine.

Prefill side: ``rooms`` (the room table where the two halves of a request meet, with the
bootstrap timeout), ``registry`` (registered decode workers, KV layout checks), ``bootstrap``
(RegisterDecode / Transfer logic behind the gRPC servicer), ``budget`` (how much of the pool may
be prefilled before the decode is ready), ``prefill`` (one request: prefill, wait for the
decode's pages, write the KV, hand over the first token).

Decode side: ``peers`` (the gRPC client of prefill bootstrap servers: register once per prefill,
transfer, ping), ``heartbeat`` (fails every room of a prefill that stops answering or restarts),
``decode`` (one request: allocate pages, get the KV and first token, then decode locally
through ``AsyncEngine.decode_incoming``).

``values``: what flows between them (``FirstToken``, ``RemotePrefill``). Proto types appear only
in ``peers``, ``wire`` (conversions both sides share) and the services' ``convert`` modules.
"""
