"""What the KV transfer backends are measured against (``python -m benchmarks.kv_transfer``):
``raw_socket``, a plain-TCP copy of the same bytes. It is a yardstick, not a backend, so the
library's backend registry (``pdmesh.kv_transfer.registry``) does not name it; the benchmark and
``harness.kv_receiver`` open it by the name ``raw``."""
