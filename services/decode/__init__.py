"""The worker service (``python -m services.decode``): ``pdmesh.v1.WorkerService`` over
``pdmesh.engine`` — stream generated tokens, abort, report load and model info. It runs
aggregated (prefill and decode locally) or, with ``--mode decode``, as the decode half of PD
disaggregation (``disagg``: KV from a prefill worker, heartbeats, timeouts)."""
