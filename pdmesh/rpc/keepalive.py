"""HTTP/2 keepalive between pdmesh services: how a caller learns that a peer hangs.

A process that is stopped (SIGSTOP), wedged or cut off keeps its TCP connections open (the
kernel still acknowledges), so a stream from it just goes quiet and a caller waiting for the
next token would wait until the request's deadline. With ``CLIENT_OPTIONS`` on a channel, grpc
pings the peer every ``PING_INTERVAL_S`` while calls are open and, when a ping is not answered
within ``PING_TIMEOUT_S``, closes the connection: every call on it fails with UNAVAILABLE
("ping timeout"), which the router retries or migrates like any dead worker's failure.

Servers must accept pings that often: grpc's default policy answers a client that pings more
than once per 5 minutes without data with GOAWAY "too_many_pings", which fails the calls on
that connection (a long prefill sends no data for seconds). ``SERVER_OPTIONS`` lets pings come
up to twice as often as a ``CLIENT_OPTIONS`` client sends them.
"""

from __future__ import annotations

PING_INTERVAL_S = 2.0
PING_TIMEOUT_S = 2.0

CLIENT_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.keepalive_time_ms", int(PING_INTERVAL_S * 1000)),
    ("grpc.keepalive_timeout_ms", int(PING_TIMEOUT_S * 1000)),
    # the unanswered ping's own timer (grpc waits a minute by default, whatever the above)
    ("grpc.http2.ping_timeout_ms", int(PING_TIMEOUT_S * 1000)),
    # a stream from the server sends no data from the client after its request; without this
    # grpc stops pinging after two pings
    ("grpc.http2.max_pings_without_data", 0),
    # a peer that comes back (a restarted tokenizer or worker on its address) is dialed again
    # within seconds: grpc's reconnect backoff otherwise grows to two minutes
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 3000),
)

SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_ping_interval_without_data_ms", int(PING_INTERVAL_S * 1000 / 2)),
)
