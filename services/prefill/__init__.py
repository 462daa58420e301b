"""The prefill worker (``python -m services.prefill``): the prefill half of disaggregated
requests. ``pdmesh.v1.WorkerService`` on ``--port`` (Generate with ``disagg`` set: prefill, ship
the KV into the decode's pages, answer with the first token) and ``pdmesh.v1.BootstrapService``
on ``--bootstrap-port``, where decode workers register and ask for each room's KV."""
