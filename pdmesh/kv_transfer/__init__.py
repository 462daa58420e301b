"""Moving KV pages between processes (PD disaggregation).

The engine already exposes what a transfer backend needs: ``LLMEngine.kv_layout()`` (one
contiguous buffer, the byte address and size of every page), ``read_pages`` / ``write_pages``,
``allocate_incoming`` and ``start_decode``. The backends — ``mooncake`` (default) and ``grpc`` —
arrive with the PD disaggregation issue; nothing here yet.
"""
