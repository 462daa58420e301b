"""The worker service (``python -m services.decode``): ``pdmesh.v1.WorkerService`` over
``pdmesh.engine`` — stream generated tokens, abort, report load and model info. It runs
aggregated (prefill and decode locally); the disaggregated decode role comes with the PD issue."""
