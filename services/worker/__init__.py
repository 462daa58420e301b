"""The worker service (``python -m services.worker``; aliases ``services.decode`` and
``services.prefill``): ``pdmesh.v1.WorkerService`` over ``pdmesh.engine`` — stream generated
tokens, abort, report load and model info — in one of three roles (``roles``): aggregated
(prefill and decode locally), decode (``disagg``: KV from a prefill worker, heartbeats,
timeouts) or prefill (with ``pdmesh.v1.BootstrapService`` on ``--bootstrap-port``)."""
