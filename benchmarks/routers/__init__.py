"""Router benchmarks: pdmesh's router beside sglang-router (PyPI), over the same workers.

``python -m benchmarks router-overhead`` (``overhead``) times what each router adds to a
request in front of trivial ``echo_worker`` processes; ``python -m benchmarks
routing-quality`` (``quality``) compares routing policies on a shared-prefix multi-tenant
workload over real engine workers. ``sglang_http`` is the SGLang-native HTTP face sglang-router
needs (the echo worker's, and ``sglang_shim``'s in front of a pdmesh worker), ``fleet`` starts
and stops the processes, ``loadgen`` drives requests.
"""
