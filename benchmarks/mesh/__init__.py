"""``python -m benchmarks mesh``: the token path from worker to client, arm by arm.

``config`` (flags) · ``stepping_engine`` + ``words`` + ``stepping_worker`` (the model-free
stepping worker) · ``procs`` (the mesh's processes) · ``arms`` + ``worker_backend`` +
``prompts`` (what each arm sends, with ``benchmarks.serve``'s backends) · ``load`` (closed-loop
clients, one or several processes) · ``cpu`` (CPU per streamed token) · ``steady`` (the rate
while every client was busy) · ``offline`` (the real engine's offline rate) · ``report``
(table, JSON) · ``main``.
"""
