"""``python -m benchmarks pd-vs-agg``: 1 prefill + 1 decode against 2 aggregated workers.

``config`` holds the flags, ``topology`` starts each topology's processes (``Fleet``),
``workload`` drives the mixed workload (steady streams + long prompts) through the router with
the load generator's gRPC backend, ``transfer`` reads the 1p1d run's KV transfers, ``report``
prints and writes the figures and ratios, ``main`` is the command line.
"""
