"""The span names, attributes and events pdmesh services emit — one vocabulary, so a trace of one
request reads the same whichever services it crossed.

Automatic (no code in the services):
- gRPC server/client spans named after the method (``/pdmesh.v1.RouterService/Generate``), from
  ``server_interceptors()`` / ``client_interceptors()``, with ``rpc.*`` semantic attributes.
- the gateway's HTTP server span ``"<METHOD> <path>"`` from ``TracingMiddleware``
  (``http.request.method``, ``url.path``, ``http.response.status_code``).

By hand, with ``span(NAME, key=value…)`` (keys become ``pdmesh.<key>`` attributes):

| span          | where            | attributes                                                   |
| ------------- | ---------------- | ------------------------------------------------------------ |
| ``tokenize``  | router           | ``prompt_tokens``, ``chat`` (bool: a chat template applied)  |
| ``route``     | router           | ``policy``, ``worker`` (aggregated) or ``prefill`` + ``decode`` (worker ids), ``cache_match_tokens`` (prefix-cache hit the policy expected), ``bootstrap_room`` |
| ``prefill``   | prefill worker   | ``prompt_tokens``, ``cached_tokens`` (prefix cache hit), ``request_id`` |
| ``kv_transfer`` | prefill worker | ``bytes``, ``pages``, ``gbps`` (GB/s), ``backend`` (``mooncake``/``grpc``), ``decode`` (peer) |
| ``decode``    | decode worker    | ``output_tokens``, ``finish_reason``, ``request_id``; event ``first_token`` when the first token leaves |

Events: ``event(FIRST_TOKEN)`` on the current span at the first token a service sends on (the
gateway's HTTP span and the router's Generate span get one too, so TTFT shows at each hop).
"""

from __future__ import annotations

ATTRIBUTE_PREFIX = "pdmesh."

TOKENIZE = "tokenize"
ROUTE = "route"
PREFILL = "prefill"
KV_TRANSFER = "kv_transfer"
DECODE = "decode"

FIRST_TOKEN = "first_token"
